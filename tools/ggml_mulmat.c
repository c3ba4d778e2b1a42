// ggml_mulmat.c: time ggml's CPU mul_mat of a quantized weight (TQ2_0, TQ1_0, ...) by an f32 activation, the way
// llama.cpp runs it, behind a tiny C API for ctypes (tools/ggml_peer.py).
//
// Why: to compare our BitNet kernels with the CPU speed to beat, llama.cpp's ggml, at the level of one
// y = x @ W^T call. Each handle builds one ggml context / graph (a single GGML_OP_MUL_MAT node), one compute plan
// with its work buffer and one persistent threadpool (as llama-bench does through llama_attach_threadpool), so
// gm_run() pays exactly what llama.cpp pays per matmul: ggml_graph_compute on the existing plan, which quantizes
// the f32 activation to the weight's vec_dot_type (q8_K for TQ1_0/TQ2_0) in the work buffer, then runs the dot
// products on n_threads threads (OpenMP in the default llama.cpp build).
//
// Built by tools/llamacpp_build.py against the libggml it builds:
//   gcc -O2 -shared -fPIC -I<llama.cpp>/ggml/include ggml_mulmat.c -L<build>/bin -lggml -lggml-base -lggml-cpu
//
// Layout: weight W is N x K (row n = output feature n, ggml tensor ne = [K, N]), x is M x K row-major,
// y = x @ W^T is M x N row-major (ggml result ne = [N, M]).

#include "ggml.h"
#include "ggml-cpu.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int M, K, N, n_threads;
    enum ggml_type type;
    struct ggml_context * ctx;
    struct ggml_tensor * w, * x, * y;
    struct ggml_cgraph * graph;
    struct ggml_cplan plan;
    struct ggml_threadpool * pool;
    void * work;
} gm_handle;

// ggml type by its ggml_type_name ("tq2_0", "tq1_0", "f32", "f16", "q8_0", ...); -1 if unknown.
static int gm_type_from_name(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * tn = ggml_type_name((enum ggml_type) t);
        if (tn && strcmp(tn, name) == 0 && ggml_blck_size((enum ggml_type) t) > 0) {
            return t;
        }
    }
    return -1;
}

// Quantize N x K floats into the weight tensor with ggml's own quantize function (ggml_quantize_chunk).
int gm_set_weight(void * handle, const float * w) {
    gm_handle * h = (gm_handle *) handle;
    size_t n = ggml_quantize_chunk(h->type, w, h->w->data, 0, h->N, h->K, NULL);
    return n == ggml_nbytes(h->w) ? 0 : -1;
}

// Dequantize the stored weight back to N x K floats (the exact weight ggml multiplies by).
int gm_get_weight(void * handle, float * w) {
    gm_handle * h = (gm_handle *) handle;
    const struct ggml_type_traits * tr = ggml_get_type_traits(h->type);
    if (h->type == GGML_TYPE_F32) {
        memcpy(w, h->w->data, (size_t) h->N * h->K * sizeof(float));
        return 0;
    }
    if (!tr->to_float) {
        return -1;
    }
    tr->to_float(h->w->data, w, (int64_t) h->N * h->K);
    return 0;
}

void gm_free(void * handle) {
    gm_handle * h = (gm_handle *) handle;
    if (!h) {
        return;
    }
    if (h->pool) {
        ggml_threadpool_free(h->pool);
    }
    free(h->work);
    if (h->ctx) {
        ggml_free(h->ctx);
    }
    free(h);
}

// Random ternary weight {-1, 0, 1} * 0.02 (xorshift, fixed seed), quantized to `type`.
static int gm_random_weight(gm_handle * h) {
    size_t n = (size_t) h->N * h->K;
    float * w = (float *) malloc(n * sizeof(float));
    if (!w) {
        return -1;
    }
    uint64_t s = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        w[i] = 0.02f * (float) ((int) (s % 3) - 1);
    }
    int rc = gm_set_weight(h, w);
    free(w);
    return rc;
}

// Create a handle for y = x @ W^T with x: M x K f32, W: N x K of ggml type `type` (by name), on n_threads.
// Returns NULL (and prints why to stderr) on a bad type, a K not divisible by the type's block size, or no memory.
void * gm_create(int M, int K, int N, const char * type, int n_threads) {
    ggml_cpu_init();
    int t = gm_type_from_name(type);
    if (t < 0 || M <= 0 || K <= 0 || N <= 0 || n_threads <= 0) {
        fprintf(stderr, "gm_create: bad arguments M=%d K=%d N=%d type=%s threads=%d\n", M, K, N, type, n_threads);
        return NULL;
    }
    if (K % ggml_blck_size((enum ggml_type) t) != 0 || ggml_quantize_requires_imatrix((enum ggml_type) t)) {
        fprintf(stderr, "gm_create: type %s needs K %% %lld == 0 and no imatrix (K=%d)\n", type,
                (long long) ggml_blck_size((enum ggml_type) t), K);
        return NULL;
    }
    gm_handle * h = (gm_handle *) calloc(1, sizeof(gm_handle));
    if (!h) {
        return NULL;
    }
    h->M = M; h->K = K; h->N = N; h->n_threads = n_threads; h->type = (enum ggml_type) t;

    size_t mem = ggml_row_size(h->type, K) * (size_t) N + sizeof(float) * ((size_t) M * K + (size_t) M * N)
               + 4 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20);
    struct ggml_init_params ip = { .mem_size = mem, .mem_buffer = NULL, .no_alloc = false };
    h->ctx = ggml_init(ip);
    if (!h->ctx) {
        gm_free(h);
        return NULL;
    }
    h->w = ggml_new_tensor_2d(h->ctx, h->type, K, N);
    h->x = ggml_new_tensor_2d(h->ctx, GGML_TYPE_F32, K, M);
    h->y = ggml_mul_mat(h->ctx, h->w, h->x);
    memset(h->x->data, 0, ggml_nbytes(h->x));
    h->graph = ggml_new_graph(h->ctx);
    ggml_build_forward_expand(h->graph, h->y);

    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    h->pool = ggml_threadpool_new(&tpp);
    if (!h->pool) {
        fprintf(stderr, "gm_create: ggml_threadpool_new(%d) failed\n", n_threads);
        gm_free(h);
        return NULL;
    }
    h->plan = ggml_graph_plan(h->graph, n_threads, h->pool);
    if (h->plan.work_size > 0) {
        h->work = aligned_alloc(64, (h->plan.work_size + 63) / 64 * 64);
        if (!h->work) {
            gm_free(h);
            return NULL;
        }
        h->plan.work_data = (uint8_t *) h->work;
    }
    if (gm_random_weight(h) != 0) {
        fprintf(stderr, "gm_create: quantizing the weight to %s failed\n", type);
        gm_free(h);
        return NULL;
    }
    return h;
}

// Compute the graph `iters` times; returns 0 on success, else the ggml_status of the failing call.
int gm_run(void * handle, int iters) {
    gm_handle * h = (gm_handle *) handle;
    for (int i = 0; i < iters; i++) {
        enum ggml_status st = ggml_graph_compute(h->graph, &h->plan);
        if (st != GGML_STATUS_SUCCESS) {
            return (int) st;
        }
    }
    return 0;
}

void gm_set_input(void * handle, const float * x) {
    gm_handle * h = (gm_handle *) handle;
    memcpy(h->x->data, x, ggml_nbytes(h->x));
}

void gm_get_output(void * handle, float * y) {
    gm_handle * h = (gm_handle *) handle;
    memcpy(y, h->y->data, ggml_nbytes(h->y));
}

// Bytes of the quantized weight (for bandwidth figures).
size_t gm_weight_bytes(void * handle) {
    return ggml_nbytes(((gm_handle *) handle)->w);
}

// JSON with ggml's version/commit and the CPU features this libggml-cpu was compiled with.
const char * gm_info(void) {
    static char buf[1024];
    ggml_cpu_init();
    snprintf(buf, sizeof(buf),
             "{\"ggml_version\": \"%s\", \"ggml_commit\": \"%s\", \"sse3\": %d, \"avx\": %d, \"avx2\": %d, "
             "\"fma\": %d, \"f16c\": %d, \"bmi2\": %d, \"avx_vnni\": %d, \"avx512\": %d, \"avx512_vbmi\": %d, "
             "\"avx512_vnni\": %d, \"avx512_bf16\": %d, \"amx_int8\": %d, \"llamafile\": %d}",
             ggml_version(), ggml_commit(), ggml_cpu_has_sse3(), ggml_cpu_has_avx(), ggml_cpu_has_avx2(),
             ggml_cpu_has_fma(), ggml_cpu_has_f16c(), ggml_cpu_has_bmi2(), ggml_cpu_has_avx_vnni(),
             ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vbmi(), ggml_cpu_has_avx512_vnni(),
             ggml_cpu_has_avx512_bf16(), ggml_cpu_has_amx_int8(), ggml_cpu_has_llamafile());
    return buf;
}
