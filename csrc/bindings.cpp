// Python bindings of minitron_fast._C. Buffers cross as integer addresses (tensor.data_ptr())
// so the extension builds without torch; the Python side (minitron_fast/ops/compact.py)
// checks dtype, contiguity and device before calling in.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "compact.h"
#include "kd_rows.h"

namespace py = pybind11;
using Index = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

namespace {
std::uint8_t* as_ptr(std::uintptr_t addr) { return reinterpret_cast<std::uint8_t*>(addr); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "minitron_fast host kernels: in-place compaction of contiguous 2-D buffers, fused KD softmax rows";
  m.def(
      "compact_rows",
      [](std::uintptr_t addr, std::int64_t n_rows, std::size_t row_bytes, Index kept, int n_threads) {
        const std::int64_t* k = kept.data();
        const std::int64_t n = static_cast<std::int64_t>(kept.size());
        py::gil_scoped_release nogil;
        return minitron::compact_rows(as_ptr(addr), n_rows, row_bytes, k, n, n_threads);
      },
      py::arg("addr"), py::arg("n_rows"), py::arg("row_bytes"), py::arg("kept"), py::arg("n_threads") = 0,
      "Keep rows `kept` (sorted, unique) of a contiguous [n_rows, row_bytes] buffer in place; "
      "returns the bytes in use.");
  m.def(
      "compact_cols",
      [](std::uintptr_t addr, std::int64_t n_rows, std::int64_t n_cols, std::size_t elem_size,
         Index kept, int n_threads) {
        const std::int64_t* k = kept.data();
        const std::int64_t n = static_cast<std::int64_t>(kept.size());
        py::gil_scoped_release nogil;
        return minitron::compact_cols(as_ptr(addr), n_rows, n_cols, elem_size, k, n, n_threads);
      },
      py::arg("addr"), py::arg("n_rows"), py::arg("n_cols"), py::arg("elem_size"), py::arg("kept"),
      py::arg("n_threads") = 0,
      "Keep columns `kept` (sorted, unique) of a contiguous [n_rows, n_cols] buffer in place; "
      "the result is contiguous [n_rows, len(kept)]. Returns the bytes in use.");
  m.def(
      "compact_2d",
      [](std::uintptr_t addr, std::int64_t n_rows, std::int64_t n_cols, std::size_t elem_size,
         std::optional<Index> rows, std::optional<Index> cols, int n_threads) {
        const std::int64_t* r = rows ? rows->data() : nullptr;
        const std::int64_t nr = rows ? static_cast<std::int64_t>(rows->size()) : 0;
        const std::int64_t* c = cols ? cols->data() : nullptr;
        const std::int64_t nc = cols ? static_cast<std::int64_t>(cols->size()) : 0;
        py::gil_scoped_release nogil;
        return minitron::compact_2d(as_ptr(addr), n_rows, n_cols, elem_size, r, nr, c, nc, n_threads);
      },
      py::arg("addr"), py::arg("n_rows"), py::arg("n_cols"), py::arg("elem_size"), py::arg("rows") = py::none(),
      py::arg("cols") = py::none(), py::arg("n_threads") = 0,
      "Keep rows `rows` and columns `cols` (sorted, unique; None keeps all) of a contiguous "
      "[n_rows, n_cols] buffer in one in-place pass; the result is contiguous. Returns the bytes in use.");
  m.def(
      "release_tail",
      [](std::uintptr_t addr, std::size_t used_bytes, std::size_t total_bytes) {
        return minitron::release_tail(as_ptr(addr), used_bytes, total_bytes);
      },
      py::arg("addr"), py::arg("used_bytes"), py::arg("total_bytes"),
      "Return the whole pages past used_bytes of a buffer to the OS; returns bytes released.");
  m.def(
      "kd_forward_kl_rows",
      [](std::uintptr_t s, std::int64_t lds, std::uintptr_t t, std::int64_t ldt, std::uintptr_t a, std::uintptr_t kd,
         std::int64_t rows, std::int64_t V, bool need_grad, int n_threads) {
        py::gil_scoped_release nogil;
        minitron::kd_forward_kl_rows(reinterpret_cast<float*>(s), lds, reinterpret_cast<float*>(t), ldt,
                                     reinterpret_cast<const float*>(a), reinterpret_cast<float*>(kd), rows, V,
                                     need_grad, n_threads);
      },
      py::arg("s"), py::arg("lds"), py::arg("t"), py::arg("ldt"), py::arg("a"), py::arg("kd"), py::arg("rows"),
      py::arg("V"), py::arg("need_grad"), py::arg("n_threads") = 0,
      "Forward KL(p_t || p_s) of fp32 softmax rows in three passes: kd[i] per row; with need_grad, "
      "s becomes a[i] * (p_s - p_t) and t exp(u_t - max). Addresses of fp32 buffers (row strides lds, ldt).");
  m.def(
      "ce_rows",
      [](std::uintptr_t z, std::int64_t ldz, std::uintptr_t g, std::int64_t ldg, std::uintptr_t label, std::uintptr_t a,
         std::uintptr_t ce, std::int64_t rows, std::int64_t V, bool need_grad, int n_threads) {
        py::gil_scoped_release nogil;
        minitron::ce_rows(reinterpret_cast<const float*>(z), ldz, reinterpret_cast<float*>(g), ldg,
                          reinterpret_cast<const std::int64_t*>(label), reinterpret_cast<const float*>(a),
                          reinterpret_cast<float*>(ce), rows, V, need_grad, n_threads);
      },
      py::arg("z"), py::arg("ldz"), py::arg("g"), py::arg("ldg"), py::arg("label"), py::arg("a"), py::arg("ce"),
      py::arg("rows"), py::arg("V"), py::arg("need_grad"), py::arg("n_threads") = 0,
      "Cross-entropy of fp32 logit rows against int64 labels in [0, V): ce[i]; with need_grad, "
      "g = a[i] * (softmax - onehot) (g may alias z). Addresses of the buffers (row strides ldz, ldg).");
  m.def(
      "kd_div_rows",
      [](int div, float beta, std::uintptr_t s, std::int64_t lds, std::uintptr_t t, std::int64_t ldt, std::uintptr_t a,
         std::uintptr_t kd, std::int64_t rows, std::int64_t V, bool need_grad, int n_threads) {
        py::gil_scoped_release nogil;
        minitron::kd_div_rows(div, beta, reinterpret_cast<float*>(s), lds, reinterpret_cast<float*>(t), ldt,
                              reinterpret_cast<const float*>(a), reinterpret_cast<float*>(kd), rows, V, need_grad,
                              n_threads);
      },
      py::arg("div"), py::arg("beta"), py::arg("s"), py::arg("lds"), py::arg("t"), py::arg("ldt"), py::arg("a"),
      py::arg("kd"), py::arg("rows"), py::arg("V"), py::arg("need_grad"), py::arg("n_threads") = 0,
      "Reverse KL (div=1) or JSD(beta) (div=2) of fp32 scaled-logit rows: kd[i]; with need_grad, s becomes "
      "a[i] * dD/du_s and t is overwritten (scratch). Addresses of fp32 buffers (row strides lds, ldt).");
  m.def(
      "kd_topk_rows",
      [](int div, float beta, std::uintptr_t s, std::int64_t lds, std::uintptr_t idx, std::uintptr_t tv, std::int64_t k,
         std::uintptr_t tail, std::uintptr_t a, std::uintptr_t kd, std::int64_t rows, std::int64_t V, bool need_grad,
         int n_threads) {
        py::gil_scoped_release nogil;
        minitron::kd_topk_rows(div, beta, reinterpret_cast<float*>(s), lds, reinterpret_cast<const std::int64_t*>(idx),
                               reinterpret_cast<const float*>(tv), k, reinterpret_cast<const float*>(tail),
                               reinterpret_cast<const float*>(a), reinterpret_cast<float*>(kd), rows, V, need_grad,
                               n_threads);
      },
      py::arg("div"), py::arg("beta"), py::arg("s"), py::arg("lds"), py::arg("idx"), py::arg("tv"), py::arg("k"),
      py::arg("tail"), py::arg("a"), py::arg("kd"), py::arg("rows"), py::arg("V"), py::arg("need_grad"),
      py::arg("n_threads") = 0,
      "Any divergence (div 0/1/2) against a top-k teacher (+ tail bucket; tail=0: none) over k + 1 buckets: kd[i]; "
      "with need_grad, s becomes a[i] * dD/du_s. idx int64 [rows, k], tv fp32 [rows, k], contiguous.");
  m.def(
      "softcap_rows",
      [](std::uintptr_t x, std::int64_t ldx, std::uintptr_t deriv, std::int64_t ldd, float c, float post,
         std::int64_t rows, std::int64_t V, int n_threads) {
        py::gil_scoped_release nogil;
        minitron::softcap_rows(reinterpret_cast<float*>(x), ldx, reinterpret_cast<float*>(deriv), ldd, c, post, rows,
                               V, n_threads);
      },
      py::arg("x"), py::arg("ldx"), py::arg("deriv"), py::arg("ldd"), py::arg("c"), py::arg("post"), py::arg("rows"),
      py::arg("V"), py::arg("n_threads") = 0,
      "Softcap fp32 rows in place: x = post * c * tanh(x / c); deriv (address or 0) = 1 - tanh^2.");
  m.def("kd_rows_isa", &minitron::kd_rows_isa, "The code path the row kernels take on this CPU.");
}
