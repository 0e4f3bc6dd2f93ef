// Past-only paged attention over the packed pages on the CPU (the layout: csrc_triton/README.md).
//
// One work item is (request, KV head, tile of query tokens); its rows are the tile's tokens times the G query
// heads of the KV head (GQA: every page is unpacked once for all of them). Per page the key codes are unpacked
// to small integers in fp32 and dotted with the query pre-multiplied by the page's per-channel scale, plus the
// query's dot with the zero-points:  q . k_t = sum_d (q_d s_d) c_dt + sum_d q_d z_d.  The value codes are
// weighted by the softmax weights times the per-token group scale, plus the weights' dot with the zero-points:
// sum_t p_t v_t = sum_t (p_t s_tg) c_t + sum_t p_t z_tg.  Calibration (eta) is in s and z already (16-bit
// metadata stores s_cal, z_cal; 8-bit metadata is decoded and calibrated per page as the reference does).
// The tail and the chunk are read at full precision. Softmax is online, in base 2, fp32 throughout.
//
// Vectors are GCC vector extensions of one machine register: 16 floats where the build has AVX-512, else 8
// (AVX2; a wider generic vector than the target's registers is split through the stack, ~10x slower). The
// register tiles of the two products are sized to the register file (32 zmm, or 16 ymm). The few places where
// an instruction matters (1-bit unpack, fp16 conversion) use AVX-512 or F16C intrinsics when compiled for them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int L = 16;     // lanes of a vector
constexpr int SC_NC = 4;  // score tile: 4 rows x SC_NC vectors of keys
constexpr int PV_R = 4;   // value tile: PV_R rows x 4 vectors of channels
#else
constexpr int L = 8;
constexpr int SC_NC = 2;
constexpr int PV_R = 2;
#endif
constexpr int CHUNK = 64; // chunk tokens per tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef uint16_t vh __attribute__((vector_size(2 * L)));

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf bc(float x) { return vf{} + x; }
#if defined(__AVX512F__)
inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
inline float hmax(vf v) { return _mm512_reduce_max_ps((__m512)v); }
#else
inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < L; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float s = v[0]; for (int i = 1; i < L; ++i) s = std::max(s, v[i]); return s; }
#endif
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// 2^x to ~1e-7 relative (x <= 0 here); exactly 0 below 2^-126.
inline vf exp2v(vf x) {
  vi under = x < -126.f;
  x = under ? bc(-126.f) : x;
  vf n = (x + 12582912.f) - 12582912.f;  // round to nearest
  vf f = x - n;                            // [-0.5, 0.5]
  vf p = bc(1.5403530e-4f);
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  vi r = (vi)p + (__builtin_convertvector(n, vi) << 23);
  return under ? bc(0.f) : (vf)r;
}

// ---- model dtype <-> fp32 ----------------------------------------------------------------------------------

template <typename T> inline vf ld16(const T* p);
template <> inline vf ld16<c10::BFloat16>(const c10::BFloat16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
template <> inline vf ld16<c10::Half>(const c10::Half* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v; for (int i = 0; i < L; ++i) v[i] = static_cast<float>(p[i]); return v;
#endif
}
template <> inline vf ld16<float>(const float* p) { return ld(p); }

template <typename T> inline void st16(T* p, vf v);
template <> inline void st16<c10::BFloat16>(c10::BFloat16* p, vf v) {
  vu u = (vu)v;
  u = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;  // round to nearest even
  vh h = __builtin_convertvector(u, vh);
  std::memcpy(p, &h, sizeof h);
}
template <> inline void st16<c10::Half>(c10::Half* p, vf v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < L; ++i) p[i] = c10::Half(v[i]);
#endif
}

// ---- codes ---------------------------------------------------------------------------------------------------

// L consecutive codes of a row (LSB first) as fp32; p points at the byte holding the first one.
template <int BITS> inline vf unpackv(const uint8_t* p);
#if defined(__AVX512F__)
template <> inline vf unpackv<1>(const uint8_t* p) {
  uint16_t w; std::memcpy(&w, p, 2);
  return (vf)_mm512_maskz_mov_ps(static_cast<__mmask16>(w), _mm512_set1_ps(1.f));
}
template <> inline vf unpackv<2>(const uint8_t* p) {
  uint32_t w; std::memcpy(&w, p, 4);
  const vu sh = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  return __builtin_convertvector((vi)(((vu{} + w) >> sh) & 3u), vf);
}
template <> inline vf unpackv<4>(const uint8_t* p) {
  uint32_t w[2]; std::memcpy(w, p, 8);
  const vi hi = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
  const vu sh = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
  vu x = hi ? (vu{} + w[1]) : (vu{} + w[0]);
  return __builtin_convertvector((vi)((x >> sh) & 15u), vf);
}
#else
template <int BITS> inline vf unpackv(const uint8_t* p) {  // 8 codes: 1, 2 or 4 bytes
  uint32_t w = 0; std::memcpy(&w, p, BITS);
  const vu sh = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
  return __builtin_convertvector((vi)(((vu{} + w) >> sh) & ((1u << BITS) - 1u)), vf);
}
#endif

// rows x (nv * L) codes -> dst (row stride ld floats).
template <int BITS>
void unpack_rows(const uint8_t* src, int rows, int row_bytes, int nv, float* dst, int ld) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < nv; ++c) st(dst + r * ld + c * L, unpackv<BITS>(src + r * row_bytes + c * L * BITS / 8));
}
using UnpackFn = void (*)(const uint8_t*, int, int, int, float*, int);
UnpackFn unpacker(int bits) {
  return bits == 1 ? unpack_rows<1> : bits == 2 ? unpack_rows<2> : unpack_rows<4>;
}

// ---- metadata --------------------------------------------------------------------------------------------------

struct MetaSpec {
  int meta_bits, bits, off, super_idx;  // super_idx: 0 for keys (k_lo, k_hi), 2 for values
  float eta, one_minus_2eta;
};

// fp32 (s_cal, z_cal) of the n groups of one section (n a multiple of 16), as xquant_vllm/quant/groups.py.
template <typename T>
void decode_meta(const uint8_t* page, int super_off, const MetaSpec& m, int n, float* s, float* z) {
  if (m.meta_bits == 16) {
    const T* a = reinterpret_cast<const T*>(page + m.off);
    for (int i = 0; i < n; i += L) { st(s + i, ld16<T>(a + i)); st(z + i, ld16<T>(a + n + i)); }
    return;
  }
  float lo, hi;
  std::memcpy(&lo, page + super_off + 4 * m.super_idx, 4);
  std::memcpy(&hi, page + super_off + 4 * m.super_idx + 4, 4);
  const float step = (hi - lo) / 255.f, range = static_cast<float>((1 << m.bits) - 1);
  const uint8_t* mn_q = page + m.off;
  const uint8_t* mx_q = mn_q + n;
  for (int i = 0; i < n; ++i) {
    const float mn = lo + static_cast<float>(mn_q[i]) * step;
    const float mx = mx_q[i] == 255 ? hi : lo + static_cast<float>(mx_q[i]) * step;
    s[i] = m.one_minus_2eta * ((mx - mn) / range);
    z[i] = mn + m.eta * (mx - mn);
  }
}

// ---- tiles ----------------------------------------------------------------------------------------------------

// S[m][t] = bias[m] + sum_d X[m][d] Kt[d][t], R rows x NC vectors of columns.
template <int R, int NC>
inline void scores_block(const float* X, int ldx, const float* bias, const float* Kt, int64_t ldk, int D,
                         float* S, int lds) {
  vf acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = bc(bias ? bias[r] : 0.f);
  for (int d = 0; d < D; ++d) {
    vf k[NC];
    for (int c = 0; c < NC; ++c) k[c] = ld(Kt + d * ldk + c * L);
    for (int r = 0; r < R; ++r) {
      const vf x = bc(X[r * ldx + d]);
      for (int c = 0; c < NC; ++c) acc[r][c] += x * k[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) st(S + r * lds + c * L, acc[r][c]);
}

template <int R>
inline void scores_rows(int nc, const float* X, int ldx, const float* bias, const float* Kt, int64_t ldk, int D,
                        float* S, int lds) {
  if constexpr (SC_NC >= 4) {
    if (nc >= 4) return scores_block<R, 4>(X, ldx, bias, Kt, ldk, D, S, lds);
    if (nc == 3) return scores_block<R, 3>(X, ldx, bias, Kt, ldk, D, S, lds);
  }
  if (nc >= 2) return scores_block<R, 2>(X, ldx, bias, Kt, ldk, D, S, lds);
  return scores_block<R, 1>(X, ldx, bias, Kt, ldk, D, S, lds);
}

// S[M][W] (W a multiple of L) = bias + X[M][D] . Kt[D][W].
void scores(int M, int W, const float* X, int ldx, const float* bias, const float* Kt, int64_t ldk, int D, float* S,
            int lds) {
  for (int c0 = 0; c0 < W; c0 += SC_NC * L) {
    const int nc = std::min(SC_NC, (W - c0) / L);
    for (int m0 = 0; m0 < M; m0 += 4) {
      const float* x = X + m0 * ldx;
      const float* b = bias ? bias + m0 : nullptr;
      float* s = S + m0 * lds + c0;
      switch (std::min(4, M - m0)) {
        case 1: scores_rows<1>(nc, x, ldx, b, Kt + c0, ldk, D, s, lds); break;
        case 2: scores_rows<2>(nc, x, ldx, b, Kt + c0, ldk, D, s, lds); break;
        case 3: scores_rows<3>(nc, x, ldx, b, Kt + c0, ldk, D, s, lds); break;
        default: scores_rows<4>(nc, x, ldx, b, Kt + c0, ldk, D, s, lds); break;
      }
    }
  }
}

// acc[m][:] += sum_{t<n} w[m][g][t] V[t][:], where channel vector k belongs to group g = k / vpg; GPC distinct
// groups per 4 vectors (4 * L channels).
template <int R, int GPC>
inline void pv_block(const float* w, int ldw_m, int ldw_g, int vpg, const float* V, int64_t ldv, int n, int D,
                     float* acc, int lda) {
  constexpr int PER = 4 / GPC;
  for (int dc = 0; dc < D / (4 * L); ++dc) {
    vf a[R][4];
    const float* wp[R][GPC];
    for (int r = 0; r < R; ++r) {
      for (int k = 0; k < 4; ++k) a[r][k] = ld(acc + r * lda + dc * 4 * L + k * L);
      for (int j = 0; j < GPC; ++j) wp[r][j] = w + r * ldw_m + ((dc * 4 + j * PER) / vpg) * ldw_g;
    }
    for (int t = 0; t < n; ++t) {
      vf v[4];
      for (int k = 0; k < 4; ++k) v[k] = ld(V + t * ldv + dc * 4 * L + k * L);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < GPC; ++j) {
          const vf x = bc(wp[r][j][t]);
          for (int k = 0; k < PER; ++k) a[r][j * PER + k] += x * v[j * PER + k];
        }
    }
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 4; ++k) st(acc + r * lda + dc * 4 * L + k * L, a[r][k]);
  }
}

template <int GPC>
void pv_gpc(int M, const float* w, int ldw_m, int ldw_g, int vpg, const float* V, int64_t ldv, int n, int D,
            float* acc, int lda) {
  for (int m0 = 0; m0 < M; m0 += PV_R) {
    const float* ww = w + m0 * ldw_m;
    float* a = acc + m0 * lda;
    const int r = std::min(PV_R, M - m0);
    if constexpr (PV_R >= 4) {
      if (r >= 4) { pv_block<4, GPC>(ww, ldw_m, ldw_g, vpg, V, ldv, n, D, a, lda); continue; }
      if (r == 3) { pv_block<3, GPC>(ww, ldw_m, ldw_g, vpg, V, ldv, n, D, a, lda); continue; }
    }
    if (r >= 2) pv_block<2, GPC>(ww, ldw_m, ldw_g, vpg, V, ldv, n, D, a, lda);
    else pv_block<1, GPC>(ww, ldw_m, ldw_g, vpg, V, ldv, n, D, a, lda);
  }
}

void pv(int M, const float* w, int ldw_m, int ldw_g, int vpg, const float* V, int64_t ldv, int n, int D, float* acc,
        int lda) {
  if (vpg >= 4) pv_gpc<1>(M, w, ldw_m, ldw_g, vpg, V, ldv, n, D, acc, lda);
  else if (vpg == 2) pv_gpc<2>(M, w, ldw_m, ldw_g, vpg, V, ldv, n, D, acc, lda);
  else pv_gpc<4>(M, w, ldw_m, ldw_g, vpg, V, ldv, n, D, acc, lda);
}

// Online softmax over one tile: S[m][0..W) (masked entries -inf) becomes P = 2^(S - max); row state updated and
// acc rescaled.
void softmax_tile(int M, int W, float* S, int lds, float* mrow, float* lrow, float* acc, int D) {
  for (int m = 0; m < M; ++m) {
    float* s = S + m * lds;
    vf vm = ld(s);
    for (int c = L; c < W; c += L) vm = vmax(vm, ld(s + c));
    const float mx = std::max(mrow[m], hmax(vm));
    if (mx == NEG_INF) {  // nothing visible yet (not reached for well-formed batches)
      std::memset(s, 0, sizeof(float) * W);
      continue;
    }
    vf sum = bc(0.f);
    for (int c = 0; c < W; c += L) {
      const vf p = exp2v(ld(s + c) - mx);
      st(s + c, p);
      sum += p;
    }
    const float alpha = std::exp2(mrow[m] - mx);
    lrow[m] = lrow[m] * alpha + hsum(sum);
    if (alpha != 1.f) {
      float* a = acc + m * D;
      for (int d = 0; d < D; d += L) st(a + d, ld(a + d) * alpha);
    }
    mrow[m] = mx;
  }
}

// ---- one work item ---------------------------------------------------------------------------------------------

struct Ctx {
  int Hq, H, G, D, B, nv, Gv, W;  // W: widest tile (max(B, CHUNK))
  const void* query; int64_t qs0, qs1;
  const float* kT; int64_t ldk;    // chunk keys, [H, D, ldk] fp32
  const float* vf32;               // chunk values, [T, H, D] fp32
  const uint8_t* pages; int64_t ps0, ps1;
  const uint8_t* lower; int64_t ls0, ls1;
  const void* tail_k; const void* tail_v; int64_t ts0, ts1;
  const int32_t *qsl, *past, *table, *slot; int64_t table_stride;
  int k_codes_off, v_codes_off, k_row, v_row, super_off;
  bool k_lower, v_lower;
  MetaSpec km, vm;
  UnpackFn unpack_k, unpack_v;
  float qscale;  // softmax scale * log2(e)
  void* out; int64_t os0, os1;
};

struct Item { int r, h, i0, ni; int64_t cost; };

struct Scratch {
  std::vector<float> buf;
  float *Q, *X, *bias, *S, *Wt, *pz, *Kt, *Vc, *ks, *kz, *vs, *vz, *vflat_s, *vflat_z, *acc, *mrow, *lrow;
  void size(const Ctx& c, int M) {
    const int D = c.D, W = c.W, nv = c.nv;
    const size_t need[] = {size_t(M) * D, size_t(M) * D, size_t(M), size_t(M) * W, size_t(M) * nv * W,
                           size_t(M) * nv, size_t(D) * W, size_t(W) * D, size_t(D), size_t(D), size_t(nv) * W,
                           size_t(nv) * W, size_t(nv) * W, size_t(nv) * W, size_t(M) * D, size_t(M), size_t(M)};
    size_t total = 0;
    for (size_t n : need) total += (n + 15) / 16 * 16;
    if (buf.size() < total) buf.resize(total);
    float** slots[] = {&Q, &X, &bias, &S, &Wt, &pz, &Kt, &Vc, &ks, &kz, &vs, &vz, &vflat_s, &vflat_z, &acc, &mrow, &lrow};
    float* p = buf.data();
    for (size_t i = 0; i < sizeof(need) / sizeof(need[0]); ++i) { *slots[i] = p; p += (need[i] + 15) / 16 * 16; }
  }
};

template <typename T>
void attend(const Ctx& c, const Item& it, Scratch& s) {
  const int G = c.G, D = c.D, B = c.B, W = c.W, nv = c.nv, M = it.ni * G;
  const int qs = c.qsl[it.r], past = c.past[it.r], nblk = past / B, nt = past % B;
  s.size(c, M);
  const T* query = static_cast<const T*>(c.query);
  for (int m = 0; m < M; ++m) {
    const T* q = query + (qs + it.i0 + m / G) * c.qs0 + (it.h * G + m % G) * c.qs1;
    for (int d = 0; d < D; d += L) st(s.Q + m * D + d, ld16<T>(q + d) * c.qscale);
    s.mrow[m] = NEG_INF;
    s.lrow[m] = 0.f;
  }
  std::memset(s.acc, 0, sizeof(float) * M * D);

  const int32_t* table = c.table + it.r * c.table_stride;
  for (int j = 0; j < nblk; ++j) {
    const int64_t block = table[j];
    const uint8_t* page = c.pages + block * c.ps0 + it.h * c.ps1;
    const uint8_t* lpage = c.lower ? c.lower + block * c.ls0 + it.h * c.ls1 : nullptr;
    // keys: X = q * s per channel, bias = q . z; scores straight from the codes
    c.unpack_k((c.k_lower ? lpage : page) + c.k_codes_off, D, c.k_row, B / L, s.Kt, W);
    decode_meta<T>(page, c.super_off, c.km, D, s.ks, s.kz);
    for (int m = 0; m < M; ++m) {
      vf b = bc(0.f);
      for (int d = 0; d < D; d += L) {
        const vf q = ld(s.Q + m * D + d);
        st(s.X + m * D + d, q * ld(s.ks + d));
        b += q * ld(s.kz + d);
      }
      s.bias[m] = hsum(b);
    }
    scores(M, B, s.X, D, s.bias, s.Kt, W, D, s.S, W);
    softmax_tile(M, B, s.S, W, s.mrow, s.lrow, s.acc, D);
    // values: weights p * s per (token, group); the zero-points add sum_t p z per group
    c.unpack_v((c.v_lower ? lpage : page) + c.v_codes_off, B, c.v_row, D / L, s.Vc, D);
    decode_meta<T>(page, c.super_off, c.vm, B * nv, s.vflat_s, s.vflat_z);
    for (int t = 0; t < B; ++t)
      for (int g = 0; g < nv; ++g) {
        s.vs[g * W + t] = s.vflat_s[t * nv + g];
        s.vz[g * W + t] = s.vflat_z[t * nv + g];
      }
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < nv; ++g) {
        vf z = bc(0.f);
        for (int t = 0; t < B; t += L) {
          const vf p = ld(s.S + m * W + t);
          st(s.Wt + (m * nv + g) * W + t, p * ld(s.vs + g * W + t));
          z += p * ld(s.vz + g * W + t);
        }
        s.pz[m * nv + g] = hsum(z);
      }
    pv(M, s.Wt, nv * W, W, c.Gv / L, s.Vc, D, B, D, s.acc, D);
    for (int m = 0; m < M; ++m)
      for (int d = 0; d < D; d += L) st(s.acc + m * D + d, ld(s.acc + m * D + d) + s.pz[m * nv + d / c.Gv]);
  }

  if (nt > 0) {  // the tail: full precision, rows 0..nt of the request's slot
    const int64_t base = c.slot[it.r] * c.ts0 + it.h * c.ts1;
    const T* tk = static_cast<const T*>(c.tail_k) + base;
    const T* tv = static_cast<const T*>(c.tail_v) + base;
    const int w = (nt + L - 1) / L * L;
    for (int d = 0; d < D; ++d) std::memset(s.Kt + d * W + nt, 0, sizeof(float) * (w - nt));
    for (int t = 0; t < nt; ++t)
      for (int d = 0; d < D; d += L) {
        const vf kv = ld16<T>(tk + t * D + d);
        for (int i = 0; i < L; ++i) s.Kt[(d + i) * W + t] = kv[i];
      }
    for (int t = 0; t < nt; ++t)
      for (int d = 0; d < D; d += L) st(s.Vc + t * D + d, ld16<T>(tv + t * D + d));
    scores(M, w, s.Q, D, nullptr, s.Kt, W, D, s.S, W);
    for (int m = 0; m < M; ++m)
      for (int t = nt; t < w; ++t) s.S[m * W + t] = NEG_INF;
    softmax_tile(M, w, s.S, W, s.mrow, s.lrow, s.acc, D);
    pv(M, s.S, W, 0, D / L, s.Vc, D, nt, D, s.acc, D);
  }

  const int last = it.i0 + it.ni;  // the chunk, causally: row token i sees chunk tokens 0..i
  for (int j0 = 0; j0 < last; j0 += CHUNK) {
    const int n = std::min(CHUNK, last - j0), w = (n + L - 1) / L * L;
    scores(M, w, s.Q, D, nullptr, c.kT + it.h * D * c.ldk + qs + j0, c.ldk, D, s.S, W);
    for (int m = 0; m < M; ++m) {
      const int see = it.i0 + m / G - j0;  // last visible column
      for (int t = std::max(see + 1, 0); t < w; ++t) s.S[m * W + t] = NEG_INF;
    }
    softmax_tile(M, w, s.S, W, s.mrow, s.lrow, s.acc, D);
    pv(M, s.S, W, 0, D / L, c.vf32 + ((int64_t)(qs + j0) * c.H + it.h) * D, (int64_t)c.H * D, n, D, s.acc, D);
  }

  T* out = static_cast<T*>(c.out);
  for (int m = 0; m < M; ++m) {
    T* o = out + (qs + it.i0 + m / G) * c.os0 + (it.h * G + m % G) * c.os1;
    const float inv = 1.f / s.lrow[m];
    for (int d = 0; d < D; d += L) st16<T>(o + d, ld(s.acc + m * D + d) * inv);
  }
}

// ---- the op ----------------------------------------------------------------------------------------------------

// layout: B, D, Gv, k_bits, v_bits, meta_bits, super_off, k_codes_off, v_codes_off, k_from_lower, v_from_lower,
// k_meta_off, v_meta_off (code offsets are the lower layer's where the codes come from it).
template <typename T>
void run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& pages,
         const at::Tensor& tail_k, const at::Tensor& tail_v, const at::Tensor& qsl, const at::Tensor& past,
         const at::Tensor& table, const at::Tensor& slot, const c10::optional<at::Tensor>& lower,
         c10::IntArrayRef layout, double k_eta, double v_eta, double scale, const at::Tensor& out) {
  Ctx c{};
  const int R = past.size(0);
  c.B = layout[0]; c.D = layout[1]; c.Gv = layout[2];
  const int k_bits = layout[3], v_bits = layout[4], meta_bits = layout[5];
  c.super_off = layout[6]; c.k_codes_off = layout[7]; c.v_codes_off = layout[8];
  c.k_lower = layout[9] != 0; c.v_lower = layout[10] != 0;
  c.Hq = query.size(1); c.H = key.size(1); c.G = c.Hq / c.H;
  c.nv = c.D / c.Gv; c.W = std::max(c.B, CHUNK);
  c.k_row = c.B * k_bits / 8; c.v_row = c.D * v_bits / 8;
  c.km = MetaSpec{meta_bits, k_bits, (int)layout[11], 0, (float)k_eta, (float)(1.0 - 2.0 * k_eta)};
  c.vm = MetaSpec{meta_bits, v_bits, (int)layout[12], 2, (float)v_eta, (float)(1.0 - 2.0 * v_eta)};
  c.unpack_k = unpacker(k_bits); c.unpack_v = unpacker(v_bits);
  c.qscale = (float)(scale * M_LOG2E);

  const int T_rows = qsl.data_ptr<int32_t>()[R];  // rows of this batch (out may have padding rows after them)
  const int H = c.H, D = c.D;
  // The chunk's keys transposed ([H, D, T + pad], fp32) and values in fp32: read by every tile of a request.
  const int64_t ldk = T_rows + CHUNK;
  std::vector<float> kT(size_t(H) * D * ldk, 0.f), vf32(size_t(std::max(T_rows, 1)) * H * D);
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
  for (int t = 0; t < T_rows; ++t)
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; d += L) {
        const vf kv = ld16<T>(k + t * ks0 + h * ks1 + d);
        for (int i = 0; i < L; ++i) kT[(h * D + d + i) * ldk + t] = kv[i];
        st(vf32.data() + (t * H + h) * D + d, ld16<T>(v + t * vs0 + h * vs1 + d));
      }
  c.kT = kT.data(); c.ldk = ldk; c.vf32 = vf32.data();
  c.query = query.data_ptr(); c.qs0 = query.stride(0); c.qs1 = query.stride(1);
  c.pages = pages.data_ptr<uint8_t>(); c.ps0 = pages.stride(0); c.ps1 = pages.stride(1);
  if (lower.has_value()) { c.lower = lower->data_ptr<uint8_t>(); c.ls0 = lower->stride(0); c.ls1 = lower->stride(1); }
  c.tail_k = tail_k.data_ptr(); c.tail_v = tail_v.data_ptr(); c.ts0 = tail_k.stride(0); c.ts1 = tail_k.stride(1);
  c.qsl = qsl.data_ptr<int32_t>(); c.past = past.data_ptr<int32_t>();
  c.table = table.data_ptr<int32_t>(); c.table_stride = table.stride(0); c.slot = slot.data_ptr<int32_t>();
  c.out = out.data_ptr(); c.os0 = out.stride(0); c.os1 = out.stride(1);

  // Work items: (request, KV head, tile of ~64 rows), costed by rows x tokens read.
  const int tile = std::max(1, 64 / c.G);
  std::vector<Item> items;
  int64_t total = 0;
  for (int r = 0; r < R; ++r) {
    const int n = c.qsl[r + 1] - c.qsl[r];
    for (int i0 = 0; i0 < n; i0 += tile) {
      const int ni = std::min(tile, n - i0);
      const int64_t cost = int64_t(ni) * c.G * (c.past[r] + i0 + ni) + 256;
      for (int h = 0; h < H; ++h) { items.push_back({r, h, i0, ni, cost}); total += cost; }
    }
  }
  // Longest first onto the least loaded thread; one pass per thread inside parallel_for.
  int threads = std::max(1, std::min<int>(at::get_num_threads(), (int)items.size()));
  if (total < (1 << 14)) threads = 1;  // too little work to wake the pool
  std::vector<std::vector<int>> bins(threads);
  {
    std::vector<int> order(items.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = (int)i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return items[a].cost > items[b].cost; });
    std::vector<int64_t> load(threads, 0);
    for (int i : order) {
      const int t = (int)(std::min_element(load.begin(), load.end()) - load.begin());
      bins[t].push_back(i);
      load[t] += items[i].cost;
    }
  }
  auto work = [&](int64_t b, int64_t e) {
    thread_local Scratch scratch;
    // Flush denormals to zero while attending: softmax weights far below a sink's (down to 2^-126) times small
    // scales, values or rescale factors land in the denormal range, where every FMA takes a microcode assist
    // (~100x slower on Intel): prompt-dependent prefill times. They are below 1e-38 of an output in [-1e3, 1e3].
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);  // FTZ | DAZ
    for (int64_t t = b; t < e; ++t)
      for (int i : bins[t]) attend<T>(c, items[i], scratch);
    _mm_setcsr(csr);
  };
  if (threads == 1) work(0, 1);
  else at::parallel_for(0, threads, 1, work);
  if (out.size(0) > T_rows) out.narrow(0, T_rows, out.size(0) - T_rows).zero_();
}

void paged_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& pages,
                     const at::Tensor& tail_k, const at::Tensor& tail_v, const at::Tensor& query_start_loc,
                     const at::Tensor& past_lens, const at::Tensor& block_table, const at::Tensor& tail_slot,
                     const c10::optional<at::Tensor>& lower_pages, c10::IntArrayRef layout, double k_eta,
                     double v_eta, double scale, const at::Tensor& out) {
  TORCH_CHECK(layout.size() == 13, "layout: expected 13 numbers, got ", layout.size());
  const int64_t B = layout[0], D = layout[1], Gv = layout[2];
  TORCH_CHECK(B % L == 0 && B > 0, "layout: block ", B, " is not a multiple of 16");
  TORCH_CHECK(D % 64 == 0 && D > 0, "layout: head size ", D, " is not a multiple of 64");
  TORCH_CHECK(Gv % L == 0 && D % Gv == 0, "layout: value group ", Gv, " is not a multiple of 16 dividing ", D);
  for (int i = 3; i < 5; ++i) TORCH_CHECK(layout[i] == 1 || layout[i] == 2 || layout[i] == 4, "layout: bits ", layout[i]);
  TORCH_CHECK(layout[5] == 8 || layout[5] == 16, "layout: meta_bits ", layout[5]);
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "query: dtype ", dt, " (expected float16 or bfloat16)");
  for (const at::Tensor* t : {&key, &value, &tail_k, &tail_v, &out})
    TORCH_CHECK(t->scalar_type() == dt, "key/value/tail/out: dtype ", t->scalar_type(), " differs from query's ", dt);
  for (const at::Tensor* t : {&query, &key, &value, &out})
    TORCH_CHECK(t->dim() == 3 && t->size(2) == D && t->stride(2) == 1, "query/key/value/out: expected [T, heads, ",
                D, "] with contiguous rows, got ", t->sizes());
  TORCH_CHECK(query.size(1) % key.size(1) == 0, "query: ", query.size(1), " heads, not a multiple of ", key.size(1));
  TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 3 && pages.stride(2) == 1 &&
              pages.size(1) == key.size(1), "pages: expected uint8 [blocks, ", key.size(1), ", page_bytes]");
  TORCH_CHECK(tail_k.is_contiguous() && tail_v.is_contiguous() && tail_k.sizes() == tail_v.sizes() &&
              tail_k.dim() == 4 && tail_k.size(2) == B && tail_k.size(3) == D,
              "tail_k/tail_v: expected contiguous [slots, heads, ", B, ", ", D, "]");
  for (const at::Tensor* t : {&query_start_loc, &past_lens, &tail_slot})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "plan: int32 contiguous index arrays expected");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1, "block_table: int32 rows expected");
  TORCH_CHECK((layout[9] == 0 && layout[10] == 0) || lower_pages.has_value(),
              "lower_pages: this layer reads its lower partner's codes");
  if (lower_pages.has_value())
    TORCH_CHECK(lower_pages->scalar_type() == at::kByte && lower_pages->dim() == 3 && lower_pages->stride(2) == 1,
                "lower_pages: expected uint8 [blocks, heads, page_bytes]");
  if (dt == at::kHalf)
    run<c10::Half>(query, key, value, pages, tail_k, tail_v, query_start_loc, past_lens, block_table, tail_slot,
                   lower_pages, layout, k_eta, v_eta, scale, out);
  else
    run<c10::BFloat16>(query, key, value, pages, tail_k, tail_v, query_start_loc, past_lens, block_table, tail_slot,
                       lower_pages, layout, k_eta, v_eta, scale, out);
}

}  // namespace

TORCH_LIBRARY(xquant_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor key, Tensor value, Tensor pages, Tensor tail_k, Tensor tail_v, "
        "Tensor query_start_loc, Tensor past_lens, Tensor block_table, Tensor tail_slot, Tensor? lower_pages, "
        "int[] layout, float k_eta, float v_eta, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(xquant_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
