// Quantize-and-store on the CPU, bit for bit the reference (xquant_vllm/quant/groups.py, layout.py write_pages).
//
// Every block this step completes is gathered (its first full_tail_count tokens from the tail slot, the rest
// from the step's rows), quantized per (block, KV head) and written as a whole page; then the rows that stay
// in a partial block are copied into the tail. The fp32 operations are the reference's, in its order, and no
// a * b + c may become one FMA (the pragma below), so the bytes are the reference's.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Section {  // one quantized tensor of a block: the groups' (min, max), their metadata and codes
  int bits;
  float eta, one_minus_2eta;
};

// Per group (min, max) -> the range the codes are computed against, and what is stored.
// 16-bit: stored (s_cal, z_cal) in the model dtype. 8-bit: stored (min_q, max_q) against the super range.
struct Meta8 { float lo, hi; };

Meta8 encode8(int n, const float* mn, const float* mx, uint8_t* min_q, uint8_t* max_q, float* qmn, float* qmx) {
  float lo = mn[0], hi = mx[0];
  for (int i = 1; i < n; ++i) { lo = std::min(lo, mn[i]); hi = std::max(hi, mx[i]); }
  const float step = (hi - lo) / 255.f;
  const float safe = step > 0.f ? step : 1.f;
  for (int i = 0; i < n; ++i) {
    float a = std::min(std::max(std::floor((mn[i] - lo) / safe), 0.f), 255.f);
    float b = std::min(std::max(std::ceil((mx[i] - lo) / safe), 0.f), 255.f);
    const float dmn = lo + a * step;
    const float dmx = b == 255.f ? hi : lo + b * step;
    if (dmn > mn[i] && a > 0.f) a -= 1.f;  // the decoded range must still cover the group
    if (dmx < mx[i] && b < 255.f) b += 1.f;
    min_q[i] = static_cast<uint8_t>(a);
    max_q[i] = static_cast<uint8_t>(b);
    qmn[i] = lo + a * step;
    qmx[i] = b == 255.f ? hi : lo + b * step;
  }
  return {lo, hi};
}

// Codes of one group of n values (stride st) against (mn, mx): rint((x - mn) / s) clamped, 0 where s == 0.
inline void codes_of(const float* x, int n, int st, float mn, float mx, int bits, uint8_t* out, int out_st) {
  const float range = static_cast<float>((1 << bits) - 1);
  const float s = (mx - mn) / range;
  for (int i = 0; i < n; ++i) {
    float c = 0.f;
    if (s > 0.f) c = std::min(std::max(std::nearbyint((x[i * st] - mn) / s), 0.f), range);
    out[i * out_st] = static_cast<uint8_t>(c);
  }
}

// s_cal, z_cal of a group, as calibrated_params: (1 - 2 eta) * ((mx - mn) / range), mn + eta * (mx - mn).
inline void calibrated(float mn, float mx, const Section& sec, float* s_cal, float* z_cal) {
  const float s = (mx - mn) / static_cast<float>((1 << sec.bits) - 1);
  *s_cal = sec.one_minus_2eta * s;
  *z_cal = mn + sec.eta * (mx - mn);
}

// Pack rows of codes (one byte each) LSB first: row r of n codes -> row_bytes bytes at dst + r * row_bytes.
void pack_rows(const uint8_t* codes, int rows, int n, int bits, uint8_t* dst) {
  const int per = 8 / bits, row_bytes = (n + per - 1) / per;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < n; ++j) dst[r * row_bytes + j / per] |= static_cast<uint8_t>(codes[r * n + j] << (bits * (j % per)));
}

struct Layout {
  int B, D, Gv, k_bits, v_bits, meta_bits, super_off, k_codes_off, v_codes_off, k_meta_off, v_meta_off, page_bytes;
};

template <typename T>
void store_block(const Layout& lay, const Section& ks, const Section& vs, const float* x_k, const float* x_v,
                 uint8_t* page) {
  const int B = lay.B, D = lay.D, Gv = lay.Gv, nv = D / Gv;
  std::memset(page, 0, lay.page_bytes);
  std::vector<float> kmn(D), kmx(D), vmn(B * nv), vmx(B * nv), kqmn(D), kqmx(D), vqmn(B * nv), vqmx(B * nv);
  std::vector<uint8_t> codes(std::max(B, 1) * D);
  // keys: one group per channel over the block's tokens (x_k is [B][D])
  for (int d = 0; d < D; ++d) {
    float a = x_k[d], b = x_k[d];
    for (int t = 1; t < B; ++t) { a = std::min(a, x_k[t * D + d]); b = std::max(b, x_k[t * D + d]); }
    kmn[d] = a; kmx[d] = b;
  }
  // values: one group per (token, Gv channels)
  for (int t = 0; t < B; ++t)
    for (int g = 0; g < nv; ++g) {
      const float* x = x_v + t * D + g * Gv;
      float a = x[0], b = x[0];
      for (int i = 1; i < Gv; ++i) { a = std::min(a, x[i]); b = std::max(b, x[i]); }
      vmn[t * nv + g] = a; vmx[t * nv + g] = b;
    }
  if (lay.meta_bits == 8) {
    const Meta8 k8 = encode8(D, kmn.data(), kmx.data(), page + lay.k_meta_off, page + lay.k_meta_off + D,
                             kqmn.data(), kqmx.data());
    const Meta8 v8 = encode8(B * nv, vmn.data(), vmx.data(), page + lay.v_meta_off, page + lay.v_meta_off + B * nv,
                             vqmn.data(), vqmx.data());
    const float sup[4] = {k8.lo, k8.hi, v8.lo, v8.hi};
    std::memcpy(page + lay.super_off, sup, sizeof sup);
  } else {
    T* km = reinterpret_cast<T*>(page + lay.k_meta_off);
    T* vm = reinterpret_cast<T*>(page + lay.v_meta_off);
    float s, z;
    for (int d = 0; d < D; ++d) {
      calibrated(kmn[d], kmx[d], ks, &s, &z);
      km[d] = T(s); km[D + d] = T(z);
    }
    for (int i = 0; i < B * nv; ++i) {
      calibrated(vmn[i], vmx[i], vs, &s, &z);
      vm[i] = T(s); vm[B * nv + i] = T(z);
    }
    kqmn = kmn; kqmx = kmx; vqmn = vmn; vqmx = vmx;
  }
  if (lay.k_codes_off >= 0) {  // rows per channel, codes along tokens
    for (int d = 0; d < D; ++d) codes_of(x_k + d, B, D, kqmn[d], kqmx[d], lay.k_bits, codes.data() + d * B, 1);
    pack_rows(codes.data(), D, B, lay.k_bits, page + lay.k_codes_off);
  }
  if (lay.v_codes_off >= 0) {  // rows per token, codes along channels
    for (int t = 0; t < B; ++t)
      for (int g = 0; g < nv; ++g)
        codes_of(x_v + t * D + g * Gv, Gv, 1, vqmn[t * nv + g], vqmx[t * nv + g], lay.v_bits,
                 codes.data() + t * D + g * Gv, 1);
    pack_rows(codes.data(), B, D, lay.v_bits, page + lay.v_codes_off);
  }
}

template <typename T>
void run(const at::Tensor& key, const at::Tensor& value, const at::Tensor& pages, const at::Tensor& tail_k,
         const at::Tensor& tail_v, const at::Tensor& block_ids, const at::Tensor& tail_slot,
         const at::Tensor& tail_count, const at::Tensor& row_start, const at::Tensor& tail_rows,
         const at::Tensor& tail_dst, const Layout& lay, const Section& ks, const Section& vs) {
  const int B = lay.B, D = lay.D, H = key.size(1), T_rows = key.size(0);
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  T* tk = tail_k.data_ptr<T>();
  T* tv = tail_v.data_ptr<T>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
  const int64_t ts0 = tail_k.stride(0), ts1 = tail_k.stride(1);
  uint8_t* pg = pages.data_ptr<uint8_t>();
  const int64_t ps0 = pages.stride(0), ps1 = pages.stride(1);
  const int32_t* ids = block_ids.data_ptr<int32_t>();
  const int32_t* slots = tail_slot.data_ptr<int32_t>();
  const int32_t* counts = tail_count.data_ptr<int32_t>();
  const int32_t* starts = row_start.data_ptr<int32_t>();
  std::vector<float> xk(size_t(B) * D), xv(size_t(B) * D);
  for (int64_t f = 0; f < block_ids.size(0); ++f)
    for (int h = 0; h < H; ++h) {
      for (int p = 0; p < B; ++p) {
        const T *ksrc, *vsrc;
        if (p < counts[f]) {
          ksrc = tk + slots[f] * ts0 + h * ts1 + p * D;
          vsrc = tv + slots[f] * ts0 + h * ts1 + p * D;
        } else {
          const int row = std::min(std::max(starts[f] + p - counts[f], 0), T_rows - 1);
          ksrc = k + row * ks0 + h * ks1;
          vsrc = v + row * vs0 + h * vs1;
        }
        for (int d = 0; d < D; ++d) { xk[p * D + d] = static_cast<float>(ksrc[d]); xv[p * D + d] = static_cast<float>(vsrc[d]); }
      }
      store_block<T>(lay, ks, vs, xk.data(), xv.data(), pg + int64_t(ids[f]) * ps0 + h * ps1);
    }
  const int32_t* rows = tail_rows.data_ptr<int32_t>();
  const int32_t* dst = tail_dst.data_ptr<int32_t>();
  for (int64_t i = 0; i < tail_rows.size(0); ++i)
    for (int h = 0; h < H; ++h) {
      const int64_t to = (dst[i] / B) * ts0 + h * ts1 + (dst[i] % B) * D;
      std::memcpy(tk + to, k + rows[i] * ks0 + h * ks1, sizeof(T) * D);
      std::memcpy(tv + to, v + rows[i] * vs0 + h * vs1, sizeof(T) * D);
    }
}

// layout: B, D, Gv, k_bits, v_bits, meta_bits, super_off, k_codes_off, v_codes_off, k_meta_off, v_meta_off,
// page_bytes (a code offset of -1: the layer stores no codes of that tensor).
void store_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& pages, const at::Tensor& tail_k,
              const at::Tensor& tail_v, const at::Tensor& full_block_ids, const at::Tensor& full_tail_slot,
              const at::Tensor& full_tail_count, const at::Tensor& full_row_start, const at::Tensor& tail_rows,
              const at::Tensor& tail_dst, c10::IntArrayRef layout, double k_eta, double v_eta) {
  TORCH_CHECK(layout.size() == 12, "layout: expected 12 numbers, got ", layout.size());
  const Layout lay{(int)layout[0], (int)layout[1], (int)layout[2], (int)layout[3], (int)layout[4], (int)layout[5],
                   (int)layout[6], (int)layout[7], (int)layout[8], (int)layout[9], (int)layout[10], (int)layout[11]};
  const auto dt = key.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "key: dtype ", dt, " (expected float16 or bfloat16)");
  for (const at::Tensor* t : {&value, &tail_k, &tail_v})
    TORCH_CHECK(t->scalar_type() == dt, "value/tail_k/tail_v: dtype ", t->scalar_type(), " differs from key's ", dt);
  for (const at::Tensor* t : {&key, &value})
    TORCH_CHECK(t->dim() == 3 && t->size(2) == lay.D && t->stride(2) == 1, "key/value: expected [T, heads, ", lay.D,
                "] with contiguous rows, got ", t->sizes());
  TORCH_CHECK(tail_k.is_contiguous() && tail_v.is_contiguous() && tail_k.dim() == 4 && tail_k.size(2) == lay.B &&
              tail_k.size(3) == lay.D && tail_k.sizes() == tail_v.sizes(),
              "tail_k/tail_v: expected contiguous [slots, heads, ", lay.B, ", ", lay.D, "]");
  TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 3 && pages.stride(2) == 1 &&
              pages.size(2) >= lay.page_bytes, "pages: expected uint8 [blocks, heads, ", lay.page_bytes, "+]");
  for (const at::Tensor* t : {&full_block_ids, &full_tail_slot, &full_tail_count, &full_row_start, &tail_rows, &tail_dst})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "plan: int32 contiguous store arrays expected");
  const Section ks{lay.k_bits, (float)k_eta, (float)(1.0 - 2.0 * k_eta)};
  const Section vs{lay.v_bits, (float)v_eta, (float)(1.0 - 2.0 * v_eta)};
  if (dt == at::kHalf)
    run<c10::Half>(key, value, pages, tail_k, tail_v, full_block_ids, full_tail_slot, full_tail_count,
                   full_row_start, tail_rows, tail_dst, lay, ks, vs);
  else
    run<c10::BFloat16>(key, value, pages, tail_k, tail_v, full_block_ids, full_tail_slot, full_tail_count,
                       full_row_start, tail_rows, tail_dst, lay, ks, vs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xquant_cpu, m) {
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) pages, Tensor(b!) tail_k, Tensor(c!) tail_v, "
        "Tensor full_block_ids, Tensor full_tail_slot, Tensor full_tail_count, Tensor full_row_start, "
        "Tensor tail_rows, Tensor tail_dst, int[] layout, float k_eta, float v_eta) -> ()");
}

TORCH_LIBRARY_IMPL(xquant_cpu, CPU, m) { m.impl("store_kv", &store_kv); }
