// Tree-attention rows and KV compaction on vLLM's CPU paged KV cache, one call per layer
// (fix-up) or per step (compaction) instead of a dozen PyTorch ops.
//
// Page layout (vLLM 0.32 CPU backend, checked at engine start by check_kv_layout): the cache is
// [num_blocks, kv_heads, block_size, 2 * head_size]; each (block, head) page holds K
// column-major ([head_size, block_size]) then V row-major ([block_size, head_size]).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// 16 fp32 lanes (one AVX-512 register, two AVX2 ones): GCC/Clang vector extensions keep the
// code portable while the products below stay register-blocked.
constexpr int64_t kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline int64_t round_up(int64_t x) { return (x + kLanes - 1) / kLanes * kLanes; }

// exp for x <= 0 (softmax exponents; -inf and very negative inputs give ~1e-38, so callers
// zero masked entries explicitly). Cephes' expf polynomial: ~1 ulp on the reduced range.
inline vfloat vexp_nonpositive(vfloat x) {
  x = x < -87.0f ? vfloat{} - 87.0f : x;
  const vfloat t = x * 1.44269504088896341f;
  const vint n = __builtin_convertvector(t - 0.5f, vint);  // ceil(t - 0.5): |t - n| <= 0.5
  const vfloat fn = __builtin_convertvector(n, vfloat);
  vfloat r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  vfloat y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vint bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// S[RB rows, TC * 16 tokens] = Q[RB, D] . K[D, tokens]; K row-major in d (k_stride floats).
template <int RB, int TC>
inline void qk_tile(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                    int64_t head_size, float* s, int64_t s_stride) {
  vfloat acc[RB][TC] = {};
  for (int64_t d = 0; d < head_size; ++d) {
    vfloat kv[TC];
    for (int c = 0; c < TC; ++c) kv[c] = vload(k + d * k_stride + c * kLanes);
    for (int i = 0; i < RB; ++i) {
      const float qd = q[i * q_stride + d];
      for (int c = 0; c < TC; ++c) acc[i][c] += qd * kv[c];
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < TC; ++c) vstore(s + i * s_stride + c * kLanes, acc[i][c]);
}

// acc[RB rows, DC * 16] += P[RB, n] . V[n, DC * 16]; V row-major (v_stride floats per token).
template <int RB, int DC>
inline void pv_tile(const float* p, int64_t p_stride, const float* v, int64_t v_stride,
                    int64_t n, float* acc, int64_t acc_stride) {
  vfloat a[RB][DC];
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < DC; ++c) a[i][c] = vload(acc + i * acc_stride + c * kLanes);
  for (int64_t t = 0; t < n; ++t) {
    vfloat vv[DC];
    for (int c = 0; c < DC; ++c) vv[c] = vload(v + t * v_stride + c * kLanes);
    for (int i = 0; i < RB; ++i) {
      const float w = p[i * p_stride + t];
      for (int c = 0; c < DC; ++c) a[i][c] += w * vv[c];
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < DC; ++c) vstore(acc + i * acc_stride + c * kLanes, a[i][c]);
}

// Tile sizes are compile-time: f(start, std::integral_constant<int, B>) over [0, total) in
// tiles of B = 4 (the last one 1-3).
template <typename F>
inline void for_tiles(int64_t total, F&& f) {
  for (int64_t start = 0; start < total; start += 4) {
    switch (std::min<int64_t>(4, total - start)) {
      case 4: f(start, std::integral_constant<int, 4>{}); break;
      case 3: f(start, std::integral_constant<int, 3>{}); break;
      case 2: f(start, std::integral_constant<int, 2>{}); break;
      default: f(start, std::integral_constant<int, 1>{});
    }
  }
}

// Online-softmax state of M query rows over blocks of keys (flash-attention style): each block
// of keys is read once for all rows of a request and KV head.
struct RowBlockAttention {
  int64_t rows = 0, head_size = 0, d_pad = 0, cap = 0;
  std::vector<float> q, acc, max, sum, scores, k_buf, v_buf;

  void reset(int64_t m, int64_t d, int64_t capacity) {
    // Only the accumulators start at zero: the tiles read q, k_buf and v_buf where written,
    // and scores past a block's n keys are never used.
    rows = m, head_size = d, d_pad = round_up(d), cap = round_up(capacity);
    q.resize(m * d_pad);
    acc.assign(m * d_pad, 0.f);
    max.assign(m, -std::numeric_limits<float>::infinity());
    sum.assign(m, 0.f);
    scores.resize(m * cap);
    k_buf.resize(head_size * cap);  // [D, cap]: key t of the block at column t
    v_buf.resize(cap * d_pad);      // [cap, D_pad]
  }

  // Attend every row to n keys: K [D, n] (k_stride floats per d; readable up to n rounded up
  // to 16), V [n, D_pad] (v_stride floats per key). visible[r * cap + t] (optional) says
  // whether row r may see key t.
  void attend(const float* k, int64_t k_stride, const float* v, int64_t v_stride, int64_t n,
              const uint8_t* visible) {
    const int64_t t_chunks = (n + kLanes - 1) / kLanes, d_chunks = d_pad / kLanes;
    for_tiles(rows, [&](int64_t r0, auto rb) {
      for_tiles(t_chunks, [&](int64_t c0, auto tc) {
        qk_tile<decltype(rb)::value, decltype(tc)::value>(
            q.data() + r0 * d_pad, d_pad, k + c0 * kLanes, k_stride, head_size,
            scores.data() + r0 * cap + c0 * kLanes, cap);
      });
    });
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores.data() + r * cap;
      const uint8_t* vis = visible ? visible + r * cap : nullptr;
      const int64_t full = n / kLanes * kLanes;  // keys in whole vectors
      float m = max[r];
      if (vis) {
        for (int64_t t = 0; t < n; ++t)
          if (vis[t]) m = std::max(m, s[t]);
      } else {
        vfloat vm = vfloat{} + m;
        for (int64_t t = 0; t < full; t += kLanes) {
          const vfloat x = vload(s + t);
          vm = x > vm ? x : vm;
        }
        for (int64_t i = 0; i < kLanes; ++i) m = std::max(m, vm[i]);
        for (int64_t t = full; t < n; ++t) m = std::max(m, s[t]);
      }
      if (m == -std::numeric_limits<float>::infinity()) {  // nothing visible in this block
        std::fill(s, s + n, 0.f);
        continue;
      }
      vfloat vz{};
      for (int64_t t = 0; t < full; t += kLanes) {
        const vfloat e = vexp_nonpositive(vload(s + t) - m);
        vstore(s + t, e);
        vz += e;
      }
      if (full < n) vstore(s + full, vexp_nonpositive(vload(s + full) - m));
      if (vis) {
        vz = vfloat{};
        for (int64_t t = 0; t < n; ++t) s[t] = vis[t] ? s[t] : 0.f;
      }
      float z = 0.f;
      for (int64_t i = 0; i < kLanes; ++i) z += vz[i];
      for (int64_t t = vis ? 0 : full; t < n; ++t) z += s[t];
      const float alpha = max[r] == -std::numeric_limits<float>::infinity()
                              ? 0.f
                              : std::exp(max[r] - m);
      max[r] = m;
      sum[r] = sum[r] * alpha + z;
      float* a = acc.data() + r * d_pad;
      for (int64_t d = 0; d < d_pad; ++d) a[d] *= alpha;
    }
    for_tiles(rows, [&](int64_t r0, auto rb) {
      for_tiles(d_chunks, [&](int64_t c0, auto dc) {
        pv_tile<decltype(rb)::value, decltype(dc)::value>(
            scores.data() + r0 * cap, cap, v + c0 * kLanes, v_stride, n,
            acc.data() + r0 * d_pad + c0 * kLanes, d_pad);
      });
    });
  }
};

// One work item = one request's fixed rows x one KV head: the group's query heads of all those
// rows (M = rows * group) attend together, so each prefix page is read once per request and
// head, not once per row. Prefix keys [0, prefix_len) are visible to every row; the tree keys
// (positions [prefix_len, prefix_len + tree_span)) come last, masked per row by its ancestors.
template <typename T>
void tree_rows_kernel(const T* query, const T* cache, T* output, const int64_t* rows,
                      const int64_t* blocks, const int64_t* prefix_len,
                      const int64_t* tree_keys, const int64_t* request_rows,
                      int64_t num_requests, int64_t max_pages, int64_t max_tree,
                      int64_t num_heads, int64_t kv_heads, int64_t block_size,
                      int64_t head_size, int64_t q_row_stride, int64_t out_row_stride,
                      float scale) {
  const int64_t group = num_heads / kv_heads;
  const int64_t page = 2 * block_size * head_size;  // elements of one (block, head) page
  // fp32 pages whose token and head dims are whole vectors are read in place; others are
  // converted (and padded) page by page into a float buffer.
  const bool direct = std::is_same<T, float>::value && block_size % kLanes == 0 &&
                      head_size % kLanes == 0;
  at::parallel_for(0, num_requests * kv_heads, 1, [&](int64_t begin, int64_t end) {
    RowBlockAttention att;
    std::vector<uint8_t> visible;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t req = work / kv_heads, g = work % kv_heads;
      const int64_t f0 = request_rows[req], f1 = request_rows[req + 1];
      const int64_t ctx = prefix_len[f0];
      const int64_t* blk = blocks + f0 * max_pages;
      int64_t tree_span = 0;
      for (int64_t f = f0; f < f1; ++f)
        for (int64_t a = 0; a < max_tree; ++a)
          tree_span = std::max(tree_span, tree_keys[f * max_tree + a] - ctx + 1);
      const int64_t m = (f1 - f0) * group;
      att.reset(m, head_size, std::max(block_size, tree_span));
      const int64_t d_pad = att.d_pad, cap = att.cap;
      for (int64_t f = f0; f < f1; ++f) {
        for (int64_t gi = 0; gi < group; ++gi) {
          const T* qh = query + rows[f] * q_row_stride + (g * group + gi) * head_size;
          float* qd = att.q.data() + ((f - f0) * group + gi) * d_pad;
          for (int64_t d = 0; d < head_size; ++d) qd[d] = static_cast<float>(qh[d]) * scale;
        }
      }
      auto page_of = [&](int64_t pos) {
        return cache + (blk[pos / block_size] * kv_heads + g) * page;
      };
      // Prefix keys a page at a time: K is [head_size, block_size], V [block_size, head_size].
      for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const int64_t n = std::min(block_size, ctx - p0);
        const T* k = page_of(p0);
        const T* v = k + block_size * head_size;
        if (direct) {  // fp32 pages are already the layout the tiles read
          att.attend(reinterpret_cast<const float*>(k), block_size,
                     reinterpret_cast<const float*>(v), head_size, n, nullptr);
          continue;
        }
        for (int64_t d = 0; d < head_size; ++d) {
          float* kb = att.k_buf.data() + d * cap;
          for (int64_t t = 0; t < n; ++t) kb[t] = static_cast<float>(k[d * block_size + t]);
        }
        for (int64_t t = 0; t < n; ++t) {
          float* vb = att.v_buf.data() + t * d_pad;
          for (int64_t d = 0; d < head_size; ++d) vb[d] = static_cast<float>(v[t * head_size + d]);
        }
        att.attend(att.k_buf.data(), cap, att.v_buf.data(), d_pad, n, nullptr);
      }
      // Tree keys: gathered position by position (they may straddle pages), masked per row.
      for (int64_t t = 0; t < tree_span; ++t) {
        const int64_t pos = ctx + t, off = pos % block_size;
        const T* k = page_of(pos);
        const T* v = k + block_size * head_size + off * head_size;
        for (int64_t d = 0; d < head_size; ++d)
          att.k_buf[d * cap + t] = static_cast<float>(k[d * block_size + off]);
        float* vb = att.v_buf.data() + t * d_pad;
        for (int64_t d = 0; d < head_size; ++d) vb[d] = static_cast<float>(v[d]);
      }
      visible.assign(m * cap, 0);
      for (int64_t f = f0; f < f1; ++f) {
        for (int64_t a = 0; a < max_tree; ++a) {
          const int64_t key = tree_keys[f * max_tree + a];
          if (key < 0) continue;
          for (int64_t gi = 0; gi < group; ++gi)
            visible[((f - f0) * group + gi) * cap + (key - ctx)] = 1;
        }
      }
      att.attend(att.k_buf.data(), cap, att.v_buf.data(), d_pad, tree_span, visible.data());
      for (int64_t f = f0; f < f1; ++f) {
        for (int64_t gi = 0; gi < group; ++gi) {
          const int64_t r = (f - f0) * group + gi;
          const float inv = 1.f / att.sum[r];
          const float* a = att.acc.data() + r * d_pad;
          T* o = output + rows[f] * out_row_stride + (g * group + gi) * head_size;
          for (int64_t d = 0; d < head_size; ++d) o[d] = static_cast<T>(a[d] * inv);
        }
      }
    }
  });
}

}  // namespace

// query [T, H, D]; kv_cache [nb, Hkv, bs, 2D]; output [T, H * D] (rows overwritten);
// rows [F]; blocks [F, P] (each fixed row's request pages in position order); prefix_len [F];
// tree_keys [F, A] (key positions of root, ancestors and the node; -1 padding);
// request_rows [R + 1] (fixed rows of request i: [request_rows[i], request_rows[i + 1]), all
// sharing one prefix and block table).
void tree_attention_rows(const torch::Tensor& query, const torch::Tensor& kv_cache,
                         torch::Tensor& output, const torch::Tensor& rows,
                         const torch::Tensor& blocks, const torch::Tensor& prefix_len,
                         const torch::Tensor& tree_keys, const torch::Tensor& request_rows,
                         double scale) {
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 4, "kv_cache: contiguous 4-D");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
              "query: [T, H, D] with contiguous heads");
  TORCH_CHECK(output.dim() == 2 && output.stride(1) == 1, "output: [T, H * D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  output.scalar_type() == kv_cache.scalar_type(),
              "query, output and kv_cache must share a dtype");
  for (const auto* t : {&rows, &blocks, &prefix_len, &tree_keys, &request_rows}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "plan: int64");
  }
  TORCH_CHECK(request_rows.dim() == 1 && request_rows.size(0) >= 1 &&
                  request_rows[-1].item<int64_t>() == rows.size(0),
              "request_rows: [R + 1] offsets ending at the number of rows");
  const int64_t num_heads = query.size(1), head_size = query.size(2);
  const int64_t kv_heads = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == 2 * head_size && num_heads % kv_heads == 0, "head shapes");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "tree_attention_rows", [&] {
        tree_rows_kernel<scalar_t>(
            query.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(),
            output.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
            prefix_len.data_ptr<int64_t>(), tree_keys.data_ptr<int64_t>(),
            request_rows.data_ptr<int64_t>(), request_rows.size(0) - 1, blocks.size(1),
            tree_keys.size(1), num_heads, kv_heads, block_size, head_size, query.stride(0),
            output.stride(0), static_cast<float>(scale));
      });
}

// Copy K/V from src_slots to dst_slots in every cache, pair by pair in order (a pair may
// read a slot an earlier pair wrote: along an accepted path, sources never precede their
// destination, so in-order copying is safe).
void copy_kv_slots(const std::vector<torch::Tensor>& caches, const torch::Tensor& src_slots,
                   const torch::Tensor& dst_slots) {
  TORCH_CHECK(src_slots.scalar_type() == torch::kInt64 && src_slots.is_contiguous() &&
                  dst_slots.scalar_type() == torch::kInt64 && dst_slots.is_contiguous() &&
                  src_slots.numel() == dst_slots.numel(),
              "slots: int64, same length");
  const int64_t n = src_slots.numel();
  const int64_t* src = src_slots.data_ptr<int64_t>();
  const int64_t* dst = dst_slots.data_ptr<int64_t>();
  for (const auto& cache : caches) {
    TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4, "kv_cache: contiguous 4-D");
    const int64_t heads = cache.size(1), bs = cache.size(2), d = cache.size(3) / 2;
    const int64_t page = 2 * bs * d;
    const int64_t elem = cache.element_size();
    char* base = static_cast<char*>(cache.data_ptr());
    at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t sb = src[i] / bs, st = src[i] % bs, db = dst[i] / bs, dt = dst[i] % bs;
          char* sp = base + (sb * heads + h) * page * elem;
          char* dp = base + (db * heads + h) * page * elem;
          for (int64_t k = 0; k < d; ++k) {  // K: column-major, one element per row d
            std::memcpy(dp + (k * bs + dt) * elem, sp + (k * bs + st) * elem, elem);
          }
          std::memcpy(dp + (bs * d + dt * d) * elem, sp + (bs * d + st * d) * elem, d * elem);
        }
      }
    });
  }
}

// Row-wise argmax of fp32 logits [R, V], the first maximal index as torch.argmax returns it
// (vLLM's greedy sampler), ~3x faster than ATen's on one core: 16 lanes each track their own
// first maximum, then the smallest index among the lanes holding the row's maximum wins.
torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 &&
                  logits.scalar_type() == torch::kFloat32,
              "logits: [R, V] float32 with contiguous rows");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  auto out = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  const float* base = logits.data_ptr<float>();
  int64_t* idx_out = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    vint lane{};
    for (int i = 0; i < kLanes; ++i) lane[i] = i;
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = base + r * stride;
      const int64_t full = vocab / kLanes * kLanes;
      float best = -std::numeric_limits<float>::infinity();
      int64_t best_idx = 0;
      if (full > 0) {
        vfloat vmax = vload(x);
        vint vidx = lane;
        for (int64_t v = kLanes; v < full; v += kLanes) {
          const vfloat cur = vload(x + v);
          const vint greater = cur > vmax;
          vmax = greater ? cur : vmax;
          vidx = greater ? lane + static_cast<int32_t>(v) : vidx;
        }
        best = vmax[0], best_idx = vidx[0];
        for (int i = 1; i < kLanes; ++i) {
          if (vmax[i] > best || (vmax[i] == best && vidx[i] < best_idx)) {
            best = vmax[i], best_idx = vidx[i];
          }
        }
      }
      for (int64_t v = full; v < vocab; ++v) {
        if (x[v] > best || (full == 0 && v == 0)) best = x[v], best_idx = v;
      }
      idx_out[r] = best_idx;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention_rows", &tree_attention_rows, "tree rows over the paged KV cache");
  m.def("argmax_rows", &argmax_rows, "row-wise first argmax of fp32 logits");
  m.def("copy_kv_slots", &copy_kv_slots, "copy K/V between slots of every cache");
}
