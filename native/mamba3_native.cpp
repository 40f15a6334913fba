// The C ABI of mamba3_native.h over the exported variant table (mamba3_variants.cpp).
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cuda_runtime.h>

#include "mamba3_native.h"
#include "mamba3_native_variants.h"

struct mamba3_step {
    const mamba3_variant *variant;
    void *module;
};

namespace {

thread_local char last_error[512] = "";

int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

bool same(const mamba3_step_desc &a, const mamba3_step_desc &b) {
    return a.nheads == b.nheads && a.ngroups == b.ngroups && a.rank == b.rank &&
           a.d_state == b.d_state && a.headdim == b.headdim && a.n_angles == b.n_angles &&
           !a.interleaved == !b.interleaved && !a.has_D == !b.has_D && !a.has_z == !b.has_z &&
           !a.has_mimo_v == !b.has_mimo_v && !a.has_mimo_z == !b.has_mimo_z &&
           !a.has_mimo_o == !b.has_mimo_o && a.dtype == b.dtype;
}

}  // namespace

extern "C" {

int mamba3_native_abi_version(void) { return MAMBA3_NATIVE_ABI_VERSION; }

int mamba3_native_variant_count(void) { return MAMBA3_NUM_VARIANTS; }

int mamba3_native_variant(int i, mamba3_step_desc *desc, const char **name) {
    if (i < 0 || i >= MAMBA3_NUM_VARIANTS)
        return fail(MAMBA3_ERR_INVALID, "variant index %d not in [0, %d)", i, MAMBA3_NUM_VARIANTS);
    if (desc) *desc = MAMBA3_VARIANTS[i].desc;
    if (name) *name = MAMBA3_VARIANTS[i].name;
    return MAMBA3_OK;
}

int mamba3_step_create(const mamba3_step_desc *desc, mamba3_step **step) {
    if (!desc || !step) return fail(MAMBA3_ERR_INVALID, "mamba3_step_create: NULL argument");
    *step = nullptr;
    for (int i = 0; i < MAMBA3_NUM_VARIANTS; ++i) {
        const mamba3_variant &v = MAMBA3_VARIANTS[i];
        if (!same(v.desc, *desc)) continue;
        cudaGetLastError();  // the module load reports through the runtime's error state
        void *module = v.load();
        cudaError_t err = cudaGetLastError();
        if (!module || err != cudaSuccess)
            return fail(MAMBA3_ERR_CUDA, "loading %s: %s", v.name, cudaGetErrorString(err));
        *step = new mamba3_step{&v, module};
        return MAMBA3_OK;
    }
    return fail(MAMBA3_ERR_NO_VARIANT,
                "no exported kernel for H=%d G=%d R=%d N=%d P=%d S=%d %s D=%d z=%d mimo_v=%d "
                "mimo_z=%d mimo_o=%d dtype=%d (add it to the export's variants)",
                desc->nheads, desc->ngroups, desc->rank, desc->d_state, desc->headdim,
                desc->n_angles, desc->interleaved ? "interleaved" : "halves", desc->has_D,
                desc->has_z, desc->has_mimo_v, desc->has_mimo_z, desc->has_mimo_o, desc->dtype);
}

const char *mamba3_step_name(const mamba3_step *step) { return step ? step->variant->name : ""; }

int mamba3_step_run(const mamba3_step *step, const mamba3_step_args *a, void *stream) {
    if (!step || !a) return fail(MAMBA3_ERR_INVALID, "mamba3_step_run: NULL argument");
    const mamba3_step_desc &d = step->variant->desc;
    if (a->batch < 0) return fail(MAMBA3_ERR_INVALID, "batch %d < 0", a->batch);
    if (a->batch == 0) return MAMBA3_OK;
    const void *required[] = {a->q, a->k, a->v, a->adt, a->dt, a->trap, a->q_bias, a->k_bias,
                              a->angles, a->state_angle, a->state_ssm, a->state_k, a->state_v,
                              a->out};
    for (const void *p : required)
        if (!p) return fail(MAMBA3_ERR_INVALID, "a required pointer is NULL");
    struct { const void *p; int32_t given; const char *name; } optional[] = {
        {a->D, d.has_D, "D"}, {a->z, d.has_z, "z"}, {a->mimo_v, d.has_mimo_v, "mimo_v"},
        {a->mimo_z, d.has_mimo_z, "mimo_z"}, {a->mimo_o, d.has_mimo_o, "mimo_o"}};
    for (const auto &o : optional)
        if (o.given && !o.p) return fail(MAMBA3_ERR_INVALID, "%s is NULL", o.name);
    if (reinterpret_cast<uintptr_t>(a->state_ssm) % 16)
        return fail(MAMBA3_ERR_INVALID, "state_ssm is not 16-byte aligned");
    // Absent tensors are never read: any valid address stands in for them.
    mamba3_step_args args = *a;
    const void **absent[] = {&args.D, &args.z, &args.mimo_v, &args.mimo_z, &args.mimo_o};
    for (const void **p : absent)
        if (!*p) *p = a->v;
    int ret = step->variant->run(step->module, &args, stream);
    if (ret != 0)
        return fail(MAMBA3_ERR_CUDA, "%s: launch failed (%d: %s)", step->variant->name, ret,
                    cudaGetErrorString(static_cast<cudaError_t>(ret)));
    return MAMBA3_OK;
}

void mamba3_step_destroy(mamba3_step *step) {
    if (!step) return;
    step->variant->unload(step->module);
    delete step;
}

const char *mamba3_last_error(void) { return last_error; }

}  // extern "C"
