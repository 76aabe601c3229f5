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
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// One fixed row: query heads of one KV head attend to the row's request prefix
// (positions [0, prefix_len)) and to its tree keys (explicit positions: root, ancestors,
// itself). Positions index the request's key sequence; blocks map them to pages.
template <typename T>
void tree_rows_kernel(const T* query, const T* cache, T* output, const int64_t* rows,
                      const int64_t* blocks, const int64_t* prefix_len,
                      const int64_t* tree_keys, int64_t num_rows, int64_t max_pages,
                      int64_t max_tree, int64_t num_heads, int64_t kv_heads,
                      int64_t block_size, int64_t head_size, int64_t q_row_stride,
                      int64_t out_row_stride, float scale) {
  const int64_t group = num_heads / kv_heads;
  const int64_t page = 2 * block_size * head_size;  // elements of one (block, head) page
  at::parallel_for(0, num_rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_size), acc(group * head_size), scores;
    for (int64_t work = begin; work < end; ++work) {
      const int64_t f = work / kv_heads, g = work % kv_heads;
      const int64_t row = rows[f], ctx = prefix_len[f];
      const int64_t* blk = blocks + f * max_pages;
      const int64_t* tk = tree_keys + f * max_tree;
      int64_t n_tree = 0;
      while (n_tree < max_tree && tk[n_tree] >= 0) ++n_tree;
      const int64_t n_keys = ctx + n_tree;
      scores.assign(group * n_keys, 0.f);
      for (int64_t gi = 0; gi < group; ++gi) {
        const T* qh = query + row * q_row_stride + (g * group + gi) * head_size;
        for (int64_t d = 0; d < head_size; ++d) q[gi * head_size + d] = to_f(qh[d]) * scale;
      }
      auto page_of = [&](int64_t pos) {
        return cache + (blk[pos / block_size] * kv_heads + g) * page;
      };
      // Prefix keys, a page at a time: K is [head_size, block_size], contiguous in tokens.
      for (int64_t p0 = 0; p0 < ctx; p0 += block_size) {
        const int64_t n = std::min(block_size, ctx - p0);
        const T* k = page_of(p0);
        for (int64_t gi = 0; gi < group; ++gi) {
          float* s = scores.data() + gi * n_keys + p0;
          const float* qg = q.data() + gi * head_size;
          for (int64_t d = 0; d < head_size; ++d) {
            const float qd = qg[d];
            const T* kd = k + d * block_size;
            for (int64_t t = 0; t < n; ++t) s[t] += qd * to_f(kd[t]);
          }
        }
      }
      // Tree keys (root, ancestors, the node itself).
      for (int64_t a = 0; a < n_tree; ++a) {
        const int64_t pos = tk[a], t = pos % block_size;
        const T* k = page_of(pos);
        for (int64_t gi = 0; gi < group; ++gi) {
          const float* qg = q.data() + gi * head_size;
          float s = 0.f;
          for (int64_t d = 0; d < head_size; ++d) s += qg[d] * to_f(k[d * block_size + t]);
          scores[gi * n_keys + ctx + a] = s;
        }
      }
      // Softmax and the weighted sum of V ([block_size, head_size] per page).
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t gi = 0; gi < group; ++gi) {
        float* s = scores.data() + gi * n_keys;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n_keys; ++i) m = std::max(m, s[i]);
        float z = 0.f;
        for (int64_t i = 0; i < n_keys; ++i) {
          s[i] = std::exp(s[i] - m);
          z += s[i];
        }
        const float inv = 1.f / z;
        float* out = acc.data() + gi * head_size;
        for (int64_t i = 0; i < n_keys; ++i) {
          const int64_t pos = i < ctx ? i : tk[i - ctx];
          const T* v = page_of(pos) + block_size * head_size + (pos % block_size) * head_size;
          const float w = s[i] * inv;
          for (int64_t d = 0; d < head_size; ++d) out[d] += w * to_f(v[d]);
        }
      }
      for (int64_t gi = 0; gi < group; ++gi) {
        T* o = output + row * out_row_stride + (g * group + gi) * head_size;
        for (int64_t d = 0; d < head_size; ++d) o[d] = static_cast<T>(acc[gi * head_size + d]);
      }
    }
  });
}

}  // namespace

// query [T, H, D]; kv_cache [nb, Hkv, bs, 2D]; output [T, H * D] (rows overwritten);
// rows [F]; blocks [F, P] (each fixed row's request pages in position order); prefix_len [F];
// tree_keys [F, A] (key positions of root, ancestors and the node; -1 padding).
void tree_attention_rows(const torch::Tensor& query, const torch::Tensor& kv_cache,
                         torch::Tensor& output, const torch::Tensor& rows,
                         const torch::Tensor& blocks, const torch::Tensor& prefix_len,
                         const torch::Tensor& tree_keys, double scale) {
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 4, "kv_cache: contiguous 4-D");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.stride(1) == query.size(2),
              "query: [T, H, D] with contiguous heads");
  TORCH_CHECK(output.dim() == 2 && output.stride(1) == 1, "output: [T, H * D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  output.scalar_type() == kv_cache.scalar_type(),
              "query, output and kv_cache must share a dtype");
  for (const auto* t : {&rows, &blocks, &prefix_len, &tree_keys}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "plan: int64");
  }
  const int64_t num_heads = query.size(1), head_size = query.size(2);
  const int64_t kv_heads = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == 2 * head_size && num_heads % kv_heads == 0, "head shapes");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, kv_cache.scalar_type(), "tree_attention_rows", [&] {
        tree_rows_kernel<scalar_t>(
            query.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(),
            output.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(),
            prefix_len.data_ptr<int64_t>(), tree_keys.data_ptr<int64_t>(), rows.size(0),
            blocks.size(1), tree_keys.size(1), num_heads, kv_heads, block_size, head_size,
            query.stride(0), output.stride(0), static_cast<float>(scale));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention_rows", &tree_attention_rows, "tree rows over the paged KV cache");
  m.def("copy_kv_slots", &copy_kv_slots, "copy K/V between slots of every cache");
}
