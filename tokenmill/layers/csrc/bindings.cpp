// Python bindings of tokenmill's CPU kernels (one extension module built from every file in csrc/).
#include <torch/extension.h>

std::vector<torch::Tensor> paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                           c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                           torch::Tensor block_tables, torch::Tensor seq_lens,
                                           torch::Tensor query_start_loc, double scale, bool return_lse,
                                           c10::optional<torch::Tensor> scores, c10::optional<torch::Tensor> score_from);
std::vector<torch::Tensor> kivi_paged_attention(torch::Tensor q, torch::Tensor k_codes, torch::Tensor v_codes,
                                                torch::Tensor k_stats, torch::Tensor v_stats, torch::Tensor res_k,
                                                torch::Tensor res_v, torch::Tensor open_slot, int64_t bits,
                                                torch::Tensor block_tables, torch::Tensor seq_lens,
                                                torch::Tensor query_start_loc, double scale, bool return_lse,
                                                c10::optional<torch::Tensor> scores,
                                                c10::optional<torch::Tensor> score_from);
void rope_kivi_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_codes,
                     torch::Tensor v_codes, torch::Tensor k_stats, torch::Tensor v_stats, torch::Tensor res_k,
                     torch::Tensor res_v, torch::Tensor res_rows, torch::Tensor seal_blocks, torch::Tensor seal_src,
                     int64_t H, int64_t Hkv, int64_t bits);
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor mins,
                        int64_t gemm_min_rows, int64_t tile_bytes, int64_t fp32_min_rows, bool int8_activations);
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, int64_t gemm_min_rows,
                        int64_t tile_bytes, int64_t fp32_min_rows, bool int8_activations);
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scales, double outlier);
torch::Tensor q4_dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor mins);
torch::Tensor q8_dequantize(torch::Tensor codes, torch::Tensor scales);
std::string cpu_isa();
torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight, double eps);
void rope_kv_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                   torch::Tensor v_cache, c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                   torch::Tensor slot_mapping, int64_t H, int64_t Hkv);
torch::Tensor silu_mul(torch::Tensor gate_up);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "paged attention over ragged query rows, with log-sum-exp and optional per-slot attention scores (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"),
        py::arg("return_lse"), py::arg("scores") = py::none(), py::arg("score_from") = py::none());
  m.def("kivi_paged_attention", &kivi_paged_attention,
        "paged attention over a KIVI cache: packed per-channel keys, per-token values, full-precision open blocks",
        py::arg("q"), py::arg("k_codes"), py::arg("v_codes"), py::arg("k_stats"), py::arg("v_stats"),
        py::arg("res_k"), py::arg("res_v"), py::arg("open_slot"), py::arg("bits"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"), py::arg("return_lse"),
        py::arg("scores") = py::none(), py::arg("score_from") = py::none());
  m.def("rope_kivi_write", &rope_kivi_write,
        "rotate q/k in place, seal the KIVI blocks the step completes, put the rest into residual rows (fp32)");
  m.def("q4_linear", &q4_linear, "x @ W^T with 4-bit block-quantized W", py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("mins"), py::arg("gemm_min_rows"), py::arg("tile_bytes"), py::arg("fp32_min_rows"),
        py::arg("int8_activations") = false);
  m.def("q8_linear", &q8_linear, "x @ W^T with 8-bit block-quantized W", py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("gemm_min_rows"), py::arg("tile_bytes"), py::arg("fp32_min_rows"),
        py::arg("int8_activations") = false);
  m.def("w8a8_linear", &w8a8_linear, "x @ W^T, x rounded to int8 per row (outlier features in fp32), W int8 with per-row scales");
  m.def("q4_dequantize", &q4_dequantize, "4-bit blocks -> fp32 rows");
  m.def("q8_dequantize", &q8_dequantize, "8-bit blocks -> fp32 rows");
  m.def("add_rms_norm", &add_rms_norm, "x += delta; rms_norm(x) * weight (fp32)");
  m.def("rope_kv_write", &rope_kv_write, "rotate q/k in place and write k/v to the paged cache (fp32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up (fp32)");
  m.def("cpu_isa", &cpu_isa, "the instruction-set level compiled in: portable, avx2 or avx512");
}
