"""One Optuna study per (GPU, backend, kernel, bucket), driven by any number of workers.

Search: when the whole space fits in the trial budget it is a grid search: every combination is
put in the study's queue (``enqueue_trial``) and workers pop them, which the storage does
atomically, so several workers never evaluate one point twice. Larger spaces use TPE (with the
constant liar, so parallel workers spread out). The kernel's default config is always queued
first: the tuned config is never worse than the heuristic.

Each trial: the config is checked against the reference (a wrong, failing or constraint-violating
config is pruned with its reason in the ``rejected`` user attribute), then timed briefly; a config
slower than ``prune_factor`` times the best so far is pruned, the others timed fully.

A trial whose parameters an earlier trial of the study already holds is not evaluated again: it
copies that trial's value (or is pruned as a duplicate while the other is still running). Trials
left running by a dead worker on this host are marked failed when a worker starts, and their
points queued again, so an interrupted run resumes without losing finished trials.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .measure import Rejected, Runner
from .space import Space, Target

# Trial user attributes.
A_DEFAULT = "default"  # the kernel's heuristic config
A_QUEUED = "queued"  # came from the queue (grid point or default)
A_REJECTED = "rejected"  # reason the config is invalid or wrong
A_PRUNED = "pruned"  # reason it was not timed fully (too slow)
A_DUPLICATE = "duplicate_of"  # number of the trial that holds the same params
A_SKIPPED = "skipped"  # asked but never given params (grid exhausted)
A_WORKER = "worker"  # host:pid of the worker that ran it
A_REL_ERR = "rel_err"
A_EVALUATED = "evaluated"  # timed fully


def open_storage(url: str | None, default_path: str | os.PathLike) -> Any:
    """An Optuna storage from a URL: None (SQLite file ``default_path``), an SQLAlchemy URL
    (``sqlite:///...``, ``postgresql://user@host/db``...), ``journal:PATH`` or a path ending in
    ``.journal``/``.log`` (a journal file, for shared file systems), or a plain file path
    (SQLite)."""
    if url is None:
        url = str(default_path)
    if url.startswith("journal:") or url.endswith((".journal", ".log")):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    if url.startswith("sqlite"):
        # Several local workers may share the file: wait for the lock rather than fail.
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        kwargs = {"pool_pre_ping": True}
    # Workers starting together may race to create the schema; the loser retries.
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _key(t: FrozenTrial) -> dict | None:
    """The params a trial holds or will hold (queued trials carry theirs as fixed params).

    A queued trial's fixed params come first: a running trial suggests its params one by one, so
    another worker can read it with only some of them set (and, comparing those, evaluate the
    same point twice).
    """
    fixed = t.system_attrs.get("fixed_params")
    if fixed:
        return dict(fixed)
    return dict(t.params) if t.params else None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, all_running: bool = False) -> int:
    """Mark trials left RUNNING by dead workers of this host (or, with ``all_running``, every
    running trial: only when no worker is alive anywhere) as FAIL. Returns how many."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(A_WORKER, "")
        h, _, pid = worker.rpartition(":")
        dead = all_running or (h == host and pid.isdigit() and not _pid_alive(int(pid)))
        if dead:
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            n += 1
    return n


def _enqueue(study: optuna.Study, space: Space, default: dict, grid: bool) -> None:
    """Queue the default config and, for a grid search, every point not yet in the study."""
    present = []
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.FAIL and A_SKIPPED not in t.user_attrs:
            k = _key(t)
            if k is not None:
                present.append(k)
    todo = [(default, {A_DEFAULT: True, A_QUEUED: True})]
    if grid:
        todo += [(p, {A_QUEUED: True}) for p in space.grid() if p != default]
    for params, attrs in todo:
        if params not in present:
            study.enqueue_trial(params, user_attrs=attrs)
            present.append(params)


def make_sampler(grid: bool, n_trials: int, seed: int | None) -> optuna.samplers.BaseSampler:
    if grid:
        # Points come from the queue; the sampler only sees the rare trial asked after the queue
        # ran dry, which is then dropped.
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=max(2, min(10, n_trials // 4)),
        multivariate=True,
        constant_liar=True,
    )


@dataclasses.dataclass
class StudyResult:
    """What one study found (an entry of the config file, plus the study for plots)."""

    target: Target
    study: optuna.Study
    entry: dict | None  # None when no config passed the check
    note: str = ""


def tune_target(
    target: Target,
    storage: Any,
    gpu_slug: str,
    device: str = "cuda",
    n_trials: int = 40,
    seed: int | None = 0,
    prune_factor: float = 3.0,
    progress: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    fail_running: bool = False,
    runner_kwargs: dict | None = None,
    search: str = "auto",
) -> StudyResult:
    """Run (or join, or resume) the study of ``target`` until its budget is spent.

    ``n_trials`` counts finished trials of all workers together. A grid search ends when the
    queue is empty. ``callbacks`` are called after every trial this worker finishes (an exception
    raised there stops the worker; the study keeps every finished trial). ``search``: "auto"
    (grid when the space fits in ``n_trials``, else TPE), "grid" (every point) or "tpe".
    """
    space = target.space()
    if search not in ("auto", "grid", "tpe"):
        raise ValueError(f"search: expected auto, grid or tpe, got {search!r}")
    grid = search == "grid" or (search == "auto" and space.size <= n_trials)
    name = target.study_name(gpu_slug)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="minimize",
        sampler=make_sampler(grid, n_trials, seed),
        load_if_exists=True,
    )
    if fail_running:
        fail_dead_trials(study, all_running=True)
    else:
        fail_dead_trials(study)
    default = space.labels_of(target.default_params())
    _enqueue(study, space, default, grid)

    runner: list[Runner] = []  # built on the first evaluation: a finished study costs nothing

    def get_runner() -> Runner:
        if not runner:
            runner.append(Runner(target, device, **(runner_kwargs or {})))
        return runner[0]

    budget = space.size if grid else n_trials
    bar = _progress(progress, budget, name, _distinct(study.get_trials(deepcopy=False)))
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            if grid:
                if not any(t.state == TrialState.WAITING for t in trials):
                    break
            else:
                # The budget counts distinct configs; repeats proposed by a converged sampler are
                # cheap (they copy the value) but bounded.
                running = sum(t.state == TrialState.RUNNING for t in trials)
                done = _distinct(trials)
                if done + running >= n_trials or done >= space.size or len(trials) >= 3 * n_trials:
                    break
            trial = study.ask()
            if grid and not trial.user_attrs.get(A_QUEUED):
                # Another worker took the last queued point between our look and our ask.
                trial.set_user_attr(A_SKIPPED, "grid exhausted")
                study.tell(trial, state=TrialState.PRUNED)
                break
            frozen = _run_trial(study, trial, space, target, get_runner, prune_factor)
            if bar is not None and A_DUPLICATE not in frozen.user_attrs:
                bar.update(1)
                bar.set_postfix_str(_best_str(study))
            for cb in callbacks:
                cb(study, frozen)
    finally:
        if bar is not None:
            bar.close()
    return summarize(target, study, space)


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    space: Space,
    target: Target,
    get_runner: Callable[[], Runner],
    prune_factor: float,
) -> FrozenTrial:
    trial.set_user_attr(A_WORKER, _worker_id())
    try:
        params = {n: trial.suggest_categorical(n, labels) for n, labels in space.choices.items()}
        dup = _earlier_duplicate(study, trial.number, params)
        if dup is not None:
            trial.set_user_attr(A_DUPLICATE, dup.number)
            if dup.state == TrialState.COMPLETE:
                return study.tell(trial, dup.value)
            return study.tell(trial, state=TrialState.PRUNED)
        runner = get_runner()
        try:
            config = target.make_config(space.decode(params))
            err = runner.check(config)
            probe = runner.time_ms(config, quick=True)
        except Exception as e:  # wrong, failing, or a config the kernel refuses
            reason = str(e) if isinstance(e, Rejected) else f"error: {type(e).__name__}: {e}"
            trial.set_user_attr(A_REJECTED, reason[:400])
            frozen = study.tell(trial, state=TrialState.PRUNED)
            if _sticky_cuda_error(reason):
                # The CUDA context is lost: every later trial of this process would fail too.
                # The bad config is recorded, so a re-run resumes past it.
                raise CudaContextLost(
                    f"config {params} broke the CUDA context ({reason}); "
                    "re-run the same command to resume"
                ) from e
            return frozen
        trial.set_user_attr(A_REL_ERR, err)
        trial.report(probe, 0)
        best = _best_value(study)
        if best is not None and probe > prune_factor * best:
            trial.set_user_attr(A_PRUNED, f"{probe:.4g} ms > {prune_factor:g} x best {best:.4g} ms")
            return study.tell(trial, state=TrialState.PRUNED)
        ms = runner.time_ms(config)
        trial.set_user_attr(A_EVALUATED, True)
        return study.tell(trial, ms)
    except BaseException:
        # Interrupted (Ctrl-C, a callback) or a bug: record the trial as failed so a resumed
        # run queues its point again, then stop.
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


class CudaContextLost(RuntimeError):
    """A config crashed the GPU context (illegal address...): this process cannot go on."""


def _sticky_cuda_error(reason: str) -> bool:
    markers = ("illegal memory access", "illegal address", "unspecified launch failure")
    return any(m in reason.lower() for m in markers)


def _earlier_duplicate(study: optuna.Study, number: int, params: dict) -> FrozenTrial | None:
    """The lowest-numbered other live trial holding ``params``, if it is earlier than ours.

    The earliest trial of a point is the one that evaluates it; later ones defer to it. Queued
    trials carry their params from the moment they are queued, so this is exact for grid
    searches; for sampled trials a tiny window remains (two workers sampling one point at once).
    """
    for t in study.get_trials(deepcopy=False):
        if t.number >= number or t.state == TrialState.FAIL or A_SKIPPED in t.user_attrs:
            continue
        if _key(t) == params:
            return t
    return None


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no completed trial yet
        return None


def _best_str(study: optuna.Study) -> str:
    best = _best_value(study)
    return f"best {best:.4g} ms" if best is not None else "no valid config yet"


def _distinct(trials: Sequence[FrozenTrial]) -> int:
    """Finished trials that evaluated a config (not duplicates, failures or skipped asks)."""
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and bool(t.params)
        and A_DUPLICATE not in t.user_attrs
        for t in trials
    )


def _progress(enabled: bool, total: int, name: str, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=min(initial, total), desc=name, unit="trial", leave=True)


def rejection_reasons(trials: Sequence[FrozenTrial], top: int = 5) -> dict[str, int]:
    """The commonest reasons among rejected ``trials`` (constraint, error or wrong result, the
    numbers in a message kept), with their counts: at most ``top``, the most frequent first."""
    counts: dict[str, int] = {}
    for t in trials:
        reason = str(t.user_attrs.get(A_REJECTED, ""))[:160]
        counts[reason] = counts.get(reason, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return dict(ranked)


def summarize(target: Target, study: optuna.Study, space: Space | None = None) -> StudyResult:
    """The config-file entry of a study: best config, its time, the default's time, counts."""
    space = space or target.space()
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    evaluated = [t for t in trials if A_DUPLICATE not in t.user_attrs and t.params]
    evaluated = [t for t in evaluated if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    rejected = [t for t in evaluated if A_REJECTED in t.user_attrs]
    default_ms = None
    note = ""
    for t in trials:
        if t.user_attrs.get(A_DEFAULT) and t.state != TrialState.FAIL:
            src = by_number.get(t.user_attrs.get(A_DUPLICATE, t.number), t)
            if src.state == TrialState.COMPLETE:
                default_ms = src.value
            elif A_REJECTED in src.user_attrs:
                note = f"default config rejected: {src.user_attrs[A_REJECTED]}"
    best = _best_value(study)
    if best is None:
        why = "; ".join(f"{n} x {r}" for r, n in rejection_reasons(rejected).items())
        return StudyResult(target, study, None,
                           note or f"no config passed the check ({why or 'none evaluated'})")
    params = space.decode(study.best_trial.params)
    config = target.make_config(params)
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    entry = {
        "backend": target.backend.name,
        "kernel": target.kernel.name,
        "mode": target.mode,
        "kernel_version": target.kernel.version,
        "bucket": target.bucket_key,
        "config": config_dict,
        "tuned_ms": round(best, 6),
        "default_ms": round(default_ms, 6) if default_ms is not None else None,
        "trials": len(evaluated),
        "rejected": len(rejected),
        "rejected_why": rejection_reasons(rejected),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return StudyResult(target, study, entry, note)
