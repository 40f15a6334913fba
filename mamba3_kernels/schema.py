"""The arguments of the registered ops, declared once.

``mamba3::scan``, ``mamba3::scan_bwd`` and ``mamba3::step`` take flat arguments (torch.library
describes tensors, not named tuples): the tensors of :class:`ScanInputs`, a state as its four
tensors, then the options. Each op's :class:`OpSchema` below is the one list of its arguments:
their names, schema types, optionality, which are differentiable and where each sits in
``ScanInputs`` (a field, or a field of its ``initial_state``). The op's torch.library schema
string, the packing of its arguments into ``ScanInputs`` and back, and the scan's gradient
bookkeeping are all read off it.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from operator import itemgetter

from .inputs import ScanInputs
from .state import Mamba3State

_tuple_new = tuple.__new__


@dataclass(frozen=True)
class Arg:
    """One op argument.

    type:     its torch.library schema type ("Tensor", "bool", "str", "SymInt").
    optional: None is allowed ("Tensor?").
    grad:     differentiable: mamba3::scan's backward returns a gradient for it.
    field:    where it sits in ScanInputs: a field name or "initial_state.<Mamba3State field>";
              None for an option, a gradient, or a tensor outside ScanInputs (an "extra": the
              step's state_indices), which comes after the op's ScanInputs tensors.
    mutable:  the op updates it in place (an alias annotation in the schema).
    """

    name: str
    type: str = "Tensor"
    optional: bool = False
    grad: bool = False
    field: str | None = None
    mutable: bool = False

    def declaration(self, index: int) -> str:
        """The argument as the schema string writes it (``index``: its position, which names
        its alias set as torch.library's own schema inference does)."""
        alias = f"(a{index}!)" if self.mutable else ""
        return f"{self.type}{'?' if self.optional else ''}{alias} {self.name}"


# ScanInputs' tensor fields before its initial state, the state's fields, and all of ScanInputs
# flattened (the state as its four tensors): the order the ops' ScanInputs arguments take.
_STATE_AT = ScanInputs._fields.index("initial_state")
TENSOR_FIELDS = ScanInputs._fields[:_STATE_AT]
STATE_FIELDS = tuple(f"initial_state.{f}" for f in Mamba3State._fields)
FLAT_FIELDS = (*TENSOR_FIELDS, *STATE_FIELDS, *ScanInputs._fields[_STATE_AT + 1 :])
_NO_STATE = (None,) * len(STATE_FIELDS)


class OpSchema:
    """One op's arguments (``args``) and result (``returns``, a schema string).

    ``schema``: the torch.library schema string; ``names``: the argument names; ``mutated``:
    the names of the arguments updated in place; ``n_tensors``: the number of leading tensor
    arguments (the options follow them), the last ``n_extra`` of them outside ScanInputs;
    ``grad_index``: the positions of the differentiable
    arguments, ``grad_names`` and ``grad_fields`` their names and ScanInputs places;
    ``bind(args)``: the op's arguments as a named tuple (``bind(args).rotary``).
    """

    def __init__(self, name: str, args: tuple[Arg, ...], returns: str) -> None:
        self.name, self.args, self.returns = name, args, returns
        self.names = tuple(a.name for a in args)
        self.schema = f"({', '.join(a.declaration(i) for i, a in enumerate(args))}) -> {returns}"
        self.mutated = tuple(a.name for a in args if a.mutable)
        tensors = [a.type == "Tensor" for a in args]
        self.n_tensors = tensors.index(False) if False in tensors else len(args)
        if any(tensors[self.n_tensors :]):
            raise ValueError(f"{name}: tensor arguments must come before the options")
        self.options = self.names[self.n_tensors :]
        self.grad_index = tuple(i for i, a in enumerate(args) if a.grad)
        self.grad_names = tuple(args[i].name for i in self.grad_index)
        self.grad_fields = tuple(args[i].field for i in self.grad_index)
        self.Args = namedtuple(name.split("::")[-1] + "_args", self.names)
        self.bind = self.Args._make
        at = {a.field: i for i, a in enumerate(args) if a.field is not None}
        self._fields = itemgetter(*(at[f] for f in TENSOR_FIELDS))
        self._state = itemgetter(*(at[f] for f in STATE_FIELDS))
        self._cu = at.get("cu_seqlens")
        # The op's tensor arguments as positions in FLAT_FIELDS (None: they are FLAT_FIELDS;
        # False: some are not in ScanInputs, so call_args cannot make them); the extras, after
        # them, are given to call_args.
        own = [a.field for a in args[: self.n_tensors]]
        self.n_extra = 0
        while own and own[-1] is None:
            own.pop()
            self.n_extra += 1
        if own == list(FLAT_FIELDS):
            self._pick = None
        else:
            self._pick = None not in own and tuple(map(FLAT_FIELDS.index, own))

    def inputs(self, args) -> ScanInputs:
        """The ScanInputs in the op's arguments ``args`` (initial_state None where the state's
        arguments are None; cu_seqlens None for an op without it)."""
        state = self._state(args)
        state = None if state[0] is None else _tuple_new(Mamba3State, state)
        cu = None if self._cu is None else args[self._cu]
        # tuple.__new__: the named tuples' own constructors are Python functions.
        return _tuple_new(ScanInputs, (*self._fields(args), state, cu))

    def call_args(self, inputs: ScanInputs, *options) -> tuple:
        """The op's arguments: its tensors from ``inputs`` (each state argument None without an
        initial state), then ``options``: the extra tensors (``n_extra``, not in ScanInputs)
        and the values of all of ``self.options``, in that order (positional: this is on the
        eager training path, where keywords cost host time). Plain Python, no itemgetter:
        torch.compile traces it in the public calls."""
        pick = self._pick
        if pick is False or len(options) != self.n_extra + len(self.options):
            raise TypeError(
                f"{self.name}: call_args takes op tensors from ScanInputs, {self.n_extra} extra "
                f"tensors and the options {self.options}, got {len(options)} values"
            )
        state = inputs[_STATE_AT]
        if pick is None:  # one tuple built, on the eager training path
            return (*inputs[:_STATE_AT], *(_NO_STATE if state is None else state),
                    *inputs[_STATE_AT + 1 :], *options)  # fmt: skip
        flat = (*inputs[:_STATE_AT], *(_NO_STATE if state is None else state),
                *inputs[_STATE_AT + 1 :])  # fmt: skip
        return (*[flat[i] for i in pick], *options)

    def grad_args(self, args) -> tuple:
        """The differentiable arguments among ``args`` (the op's arguments), in op order."""
        return tuple(args[i] for i in self.grad_index)

    def per_argument(self, grads, args) -> tuple:
        """One entry per op argument: the gradient (``grads``, in grad_index order) of each
        differentiable argument that is present in ``args``, None for the rest."""
        result = [None] * len(self.args)
        for i, g in zip(self.grad_index, grads, strict=True):
            if args[i] is not None:
                result[i] = g
        return tuple(result)


def _tensors(names: tuple[str, ...], **kw) -> tuple[Arg, ...]:
    """Arguments carrying the ScanInputs fields ``names``."""
    return tuple(Arg(n, field=n, **kw) for n in names)


def _state(pattern: str, **kw) -> tuple[Arg, ...]:
    """Arguments carrying a state's fields (``pattern`` makes each name of a field's)."""
    fields = Mamba3State._fields
    return tuple(Arg(pattern.format(f), field=f"initial_state.{f}", **kw) for f in fields)


# ScanInputs' tensors: q .. angles always given, D .. mimo_o optional (None when absent).
_REQUIRED = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles")
_OPTIONAL = ("D", "z", "mimo_v", "mimo_z", "mimo_o")
_DEFAULTED = set(TENSOR_FIELDS) & set(ScanInputs._field_defaults)  # ScanInputs' None defaults
if (*_REQUIRED, *_OPTIONAL) != TENSOR_FIELDS or set(_OPTIONAL) != _DEFAULTED:
    raise AssertionError("the ops' tensors must be ScanInputs' fields, optional where it has None")

SCAN = OpSchema(
    "mamba3::scan",
    (
        *_tensors(_REQUIRED, grad=True),
        *_tensors(_OPTIONAL, grad=True, optional=True),
        *_state("{}0", grad=True, optional=True),  # the initial state: all four or none
        Arg("cu_seqlens", optional=True, field="cu_seqlens"),
        Arg("return_final_state", "bool"),
        Arg("rotary", "str"),
        Arg("chunk_size", "SymInt"),  # <= 0: the backend's choice
        Arg("backend", "str"),
    ),
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
)
# mamba3::scan's results: out, then the final state (empty tensors without one).
SCAN_OUTPUTS = ("out", *Mamba3State._fields)

# The gradients of the scan's results, then the scan's arguments; returns the gradients of the
# differentiable ones (SCAN.grad_names order; an empty tensor for an absent one).
SCAN_BWD = OpSchema(
    "mamba3::scan_bwd", (*(Arg(f"grad_{n}") for n in SCAN_OUTPUTS), *SCAN.args), "Tensor[]"
)

# No autograd; the state it updates sits between the required and the optional tensors.
STEP = OpSchema(
    "mamba3::step",
    (
        *_tensors(_REQUIRED),
        *_state("{}_state", mutable=True),
        *_tensors(_OPTIONAL, optional=True),
        # (B,) int32/int64: the pool slot of each batch row (negative: padding), or None
        Arg("state_indices", optional=True),
        Arg("rotary", "str"),
        Arg("backend", "str"),
    ),
    "Tensor",
)

# The scan's differentiable arguments are ScanInputs' tensor fields and its state's, so that
# grad_tensors reads them off without a lookup.
if SCAN.grad_fields != (*TENSOR_FIELDS, *STATE_FIELDS):
    raise AssertionError(f"grad_tensors assumes these differentiable fields: {SCAN.grad_fields}")


def grad_tensors(inputs: ScanInputs) -> tuple:
    """The tensors of ``inputs`` that mamba3::scan differentiates (None where absent; no state
    tensors without an initial state)."""
    state = inputs[_STATE_AT]
    return inputs[:_STATE_AT] if state is None else (*inputs[:_STATE_AT], *state)
