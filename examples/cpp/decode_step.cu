// Decode steps from plain C++ through libmamba3_native (native/mamba3_native.h).
//
//   decode_step CASE.bin    runs the case that examples/cpp/make_case.py wrote (a float64
//                           reference of every step) and checks out and the final state
//   decode_step --list      prints the exported kernel variants
//
// Host code only: nvcc (or any C++ compiler with the CUDA runtime's headers) builds it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "mamba3_native.h"

namespace {

#define CHECK_CUDA(x)                                                                  \
    do {                                                                               \
        cudaError_t err_ = (x);                                                        \
        if (err_ != cudaSuccess) {                                                     \
            std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(err_));            \
            std::exit(1);                                                              \
        }                                                                              \
    } while (0)

struct Reader {
    FILE *f;
    bool ok = true;
    int32_t i32() {
        int32_t x = 0;
        ok = ok && std::fread(&x, sizeof x, 1, f) == 1;
        return x;
    }
    std::vector<char> blob() {  // int64 byte count, then the bytes
        int64_t n = 0;
        ok = ok && std::fread(&n, sizeof n, 1, f) == 1 && n >= 0;
        std::vector<char> b(ok ? static_cast<size_t>(n) : 0);
        ok = ok && (n == 0 || std::fread(b.data(), 1, b.size(), f) == b.size());
        return b;
    }
};

// A device copy of a host blob (nullptr for an empty one: an absent optional tensor).
void *to_device(const std::vector<char> &b) {
    if (b.empty()) return nullptr;
    void *p = nullptr;
    CHECK_CUDA(cudaMalloc(&p, b.size()));
    CHECK_CUDA(cudaMemcpy(p, b.data(), b.size(), cudaMemcpyHostToDevice));
    return p;
}

std::vector<float> to_float(const void *dev, size_t count, int dtype) {
    size_t width = dtype == MAMBA3_FP32 ? 4 : 2;
    std::vector<char> raw(count * width);
    CHECK_CUDA(cudaMemcpy(raw.data(), dev, raw.size(), cudaMemcpyDeviceToHost));
    std::vector<float> out(count);
    for (size_t i = 0; i < count; ++i) {
        if (dtype == MAMBA3_FP32) {
            std::memcpy(&out[i], raw.data() + 4 * i, 4);
        } else if (dtype == MAMBA3_BF16) {
            __nv_bfloat16 h;
            std::memcpy(&h, raw.data() + 2 * i, 2);
            out[i] = __bfloat162float(h);
        } else {
            __half h;
            std::memcpy(&h, raw.data() + 2 * i, 2);
            out[i] = __half2float(h);
        }
    }
    return out;
}

double rel_err(const std::vector<float> &got, const std::vector<char> &want_blob) {
    const float *want = reinterpret_cast<const float *>(want_blob.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        double d = double(got[i]) - double(want[i]);
        num += d * d;
        den += double(want[i]) * double(want[i]);
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}

int list_variants() {
    int n = mamba3_native_variant_count();
    for (int i = 0; i < n; ++i) {
        const char *name = nullptr;
        mamba3_native_variant(i, nullptr, &name);
        std::printf("%s\n", name);
    }
    return 0;
}

int run_case(const char *path) {
    FILE *f = std::fopen(path, "rb");
    if (!f) {
        std::fprintf(stderr, "cannot open %s\n", path);
        return 2;
    }
    Reader r{f};
    char magic[4] = {};
    r.ok = std::fread(magic, 1, 4, f) == 4 && std::memcmp(magic, "M3DC", 4) == 0;
    if (!r.ok || r.i32() != 1) {
        std::fprintf(stderr, "%s: not a decode case (version 1)\n", path);
        return 2;
    }
    mamba3_step_desc d;
    int32_t *fields = &d.nheads;  // the descriptor is 13 int32 in its declared order
    for (int i = 0; i < 13; ++i) fields[i] = r.i32();
    int32_t batch = r.i32(), steps = r.i32();
    // q_bias, k_bias, D, mimo_v, mimo_z, mimo_o (fp32; empty where absent), then the initial
    // state: angle, ssm (fp32), k, v (the dtype).
    void *dev[10];
    for (int i = 0; i < 10; ++i) dev[i] = to_device(r.blob());

    mamba3_step *step = nullptr;
    if (mamba3_step_create(&d, &step) != MAMBA3_OK) {
        std::fprintf(stderr, "mamba3_step_create: %s\n", mamba3_last_error());
        return 1;
    }
    std::printf("kernel %s, batch %d, %d steps\n", mamba3_step_name(step), batch, steps);
    const int H = d.nheads, G = d.ngroups, R = d.rank, N = d.d_state, P = d.headdim,
              S = d.n_angles;
    const bool keep = d.has_mimo_v && !d.has_mimo_o;
    size_t out_count = size_t(batch) * (keep ? R : 1) * H * P;
    size_t width = d.dtype == MAMBA3_FP32 ? 4 : 2;
    void *out = nullptr;
    CHECK_CUDA(cudaMalloc(&out, out_count * width));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreate(&stream));
    double tol = d.dtype == MAMBA3_FP32 ? 1e-3 : 2e-2, worst = 0;
    for (int t = 0; t < steps && r.ok; ++t) {
        void *in[8];  // q, k, v, z, adt, dt, trap, angles: contiguous
        for (int i = 0; i < 8; ++i) in[i] = to_device(r.blob());
        std::vector<char> want = r.blob();
        mamba3_step_args a = {};
        a.q = in[0], a.k = in[1], a.v = in[2], a.z = in[3];
        a.adt = in[4], a.dt = in[5], a.trap = in[6], a.angles = in[7];
        a.q_bias = dev[0], a.k_bias = dev[1], a.D = dev[2];
        a.mimo_v = dev[3], a.mimo_z = dev[4], a.mimo_o = dev[5];
        a.state_angle = dev[6], a.state_ssm = dev[7], a.state_k = dev[8], a.state_v = dev[9];
        a.out = out;
        a.batch = batch;
        a.stride_q = a.stride_k = R * G * N;
        a.stride_v = a.stride_z = H * P;
        a.stride_adt = a.stride_dt = a.stride_trap = H;
        a.stride_angles = H * S;
        if (mamba3_step_run(step, &a, stream) != MAMBA3_OK) {
            std::fprintf(stderr, "mamba3_step_run: %s\n", mamba3_last_error());
            return 1;
        }
        CHECK_CUDA(cudaStreamSynchronize(stream));
        double e = rel_err(to_float(out, out_count, d.dtype), want);
        worst = e > worst ? e : worst;
        for (void *p : in) cudaFree(p);
    }
    // The final state against the reference's (fp32 copies).
    size_t counts[4] = {size_t(batch) * H * S, size_t(batch) * H * P * N,
                        size_t(batch) * R * H * N, size_t(batch) * H * P};
    int types[4] = {MAMBA3_FP32, MAMBA3_FP32, d.dtype, d.dtype};
    double state_err[4];
    for (int i = 0; i < 4; ++i) state_err[i] = rel_err(to_float(dev[6 + i], counts[i], types[i]),
                                                       r.blob());
    std::fclose(f);
    if (!r.ok) {
        std::fprintf(stderr, "%s: truncated\n", path);
        return 2;
    }
    // The angle is compared as it is stored (not reduced modulo 2 pi: neither side reduces it).
    bool pass = worst < tol && state_err[1] < tol && state_err[0] < 1e-4;
    std::printf("out rel err (worst step) %.3g, state: angle %.3g ssm %.3g k %.3g v %.3g: %s\n",
                worst, state_err[0], state_err[1], state_err[2], state_err[3],
                pass ? "PASS" : "FAIL");
    mamba3_step_destroy(step);
    cudaStreamDestroy(stream);
    return pass ? 0 : 1;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc == 2 && std::strcmp(argv[1], "--list") == 0) return list_variants();
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s CASE.bin | --list\n", argv[0]);
        return 2;
    }
    return run_case(argv[1]);
}
