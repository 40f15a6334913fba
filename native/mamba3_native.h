/* mamba3_native: the Mamba-3 decode step (CuTe DSL kernels exported ahead of time) behind a
 * small C ABI. Build: the top-level CMakeLists.txt. Use:
 *
 *   mamba3_step_desc desc = {...};          sizes and flags of one layer (not the batch)
 *   mamba3_step *step;
 *   if (mamba3_step_create(&desc, &step) != 0) puts(mamba3_last_error());
 *   mamba3_step_args args = {...};          device pointers, batch size, batch strides
 *   mamba3_step_run(step, &args, stream);   one kernel launch on `stream` (a cudaStream_t)
 *   mamba3_step_destroy(step);
 *
 * The function is docs/spec.md section 9 (the recurrence for one token): it reads the inputs
 * and the state, updates the state in place and writes out. A run does not allocate, copy or
 * synchronize, so it can be captured in a CUDA graph.
 *
 * Layouts (element types: T is the dtype of the descriptor, every other tensor is fp32):
 *   q, k       T  (B, G, N) SISO, (B, R, G, N) MIMO   inner axes packed, batch stride given
 *   v, z       T  (B, H, P)                           inner axes packed, batch stride given
 *   adt, dt, trap  (B, H)                              batch stride given
 *   angles         (B, H, S)                           inner axes packed, batch stride given
 *   q_bias, k_bias (H, N) or (H, R, N)                 contiguous
 *   D (H,), mimo_v, mimo_z, mimo_o (H, R, P)           contiguous; NULL where absent
 *   state_angle (B, H, S), state_ssm (B, H, P, N)      contiguous (state_ssm 16-byte aligned)
 *   state_k  T  (B, R, H, N), state_v T (B, H, P)      contiguous
 *   out      T  (B, H, P), or (B, R, H, P) for MIMO without mimo_o; contiguous
 * Strides are in elements. Optional tensors must be given exactly when the descriptor says so.
 */
#ifndef MAMBA3_NATIVE_H
#define MAMBA3_NATIVE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MAMBA3_NATIVE_ABI_VERSION 1

enum { MAMBA3_BF16 = 0, MAMBA3_FP16 = 1, MAMBA3_FP32 = 2 };

enum {
    MAMBA3_OK = 0,
    MAMBA3_ERR_INVALID = 1,     /* a NULL or misaligned pointer, a negative size */
    MAMBA3_ERR_NO_VARIANT = 2,  /* no exported kernel for these sizes and flags */
    MAMBA3_ERR_CUDA = 3         /* the launch failed (see mamba3_last_error) */
};

typedef struct mamba3_step_desc {
    int32_t nheads, ngroups, rank, d_state, headdim, n_angles;
    int32_t interleaved; /* 1: pairs (2j, 2j + 1); 0: pairs (j, N/2 + j) */
    int32_t has_D, has_z, has_mimo_v, has_mimo_z, has_mimo_o;
    int32_t dtype; /* MAMBA3_BF16, MAMBA3_FP16 or MAMBA3_FP32 */
} mamba3_step_desc;

typedef struct mamba3_step_args {
    const void *q, *k, *v, *z, *adt, *dt, *trap, *q_bias, *k_bias, *angles;
    const void *D, *mimo_v, *mimo_z, *mimo_o;
    void *state_angle, *state_ssm, *state_k, *state_v, *out;
    int32_t batch;
    int32_t stride_q, stride_k, stride_v, stride_z, stride_adt, stride_dt, stride_trap,
        stride_angles;
} mamba3_step_args;

typedef struct mamba3_step mamba3_step;

/* The ABI version this library implements (MAMBA3_NATIVE_ABI_VERSION of its build). */
int mamba3_native_abi_version(void);
/* The number of exported kernel variants, and variant i's descriptor and name. */
int mamba3_native_variant_count(void);
int mamba3_native_variant(int i, mamba3_step_desc *desc, const char **name);
/* Create a step for `desc`: loads its kernel onto every visible device (the CUDA runtime's
 * current context). Returns MAMBA3_OK and sets *step, or an error code. */
int mamba3_step_create(const mamba3_step_desc *desc, mamba3_step **step);
/* The exported kernel's name (sizes, flags and config) of a created step. */
const char *mamba3_step_name(const mamba3_step *step);
/* One decode step: a single kernel launch on `stream` (a cudaStream_t; NULL: the default). */
int mamba3_step_run(const mamba3_step *step, const mamba3_step_args *args, void *stream);
void mamba3_step_destroy(mamba3_step *step);
/* The last error's message on this thread ("" if none). */
const char *mamba3_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* MAMBA3_NATIVE_H */
