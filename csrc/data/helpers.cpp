// Index builders for the GPT and blended datasets (module megatron_msg._data_helpers).
//
// build_sample_idx_{int32,int64}: the GPT sample index (Megatron's design). The
//   documents listed in doc_idx are concatenated into one token stream; sample j
//   covers stream positions [j*seq_length, (j+1)*seq_length] (seq_length+1 tokens,
//   consecutive samples share one token). Row j of the result is (position in
//   doc_idx, offset in that document) of sample j's first token; row j+1 gives its
//   last token. Row 0 is (0, 0), as in Megatron-LM, even when document 0 is empty.
// build_blending_indices: for each blended sample, which dataset it comes from and
//   the running sample count inside that dataset; a greedy choice of the dataset
//   lagging furthest behind its weight (Megatron-LM's rule), so any prefix of the
//   blend follows the weights as closely as integer counts allow.
//
// Inputs are validated in Python (megatron_msg/data/gpt_dataset.py, blended.py);
// the checks here guard memory safety only, and report through ValueError.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<T> build_sample_idx(const py::array_t<int32_t, py::array::c_style> &sizes_,
                                const py::array_t<T, py::array::c_style> &doc_idx_,
                                int64_t seq_length, int64_t num_samples) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
  const int64_t num_sizes = sizes_.shape(0);
  const int64_t num_docs = doc_idx_.shape(0);
  if (num_docs == 0) throw std::invalid_argument("doc_idx is empty");
  const int32_t *sizes = sizes_.data();
  const T *doc_idx = doc_idx_.data();

  py::array_t<T> result(std::vector<py::ssize_t>{num_samples + 1, 2});
  T *out = result.mutable_data();
  bool out_of_range = false;
  bool ran_out = false;
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;  // position in doc_idx
    int64_t offset = 0;   // token offset inside that document
    out[0] = 0;
    out[1] = 0;
    for (int64_t sample = 1; sample <= num_samples && !out_of_range && !ran_out; ++sample) {
      // Tokens still to cover; the +1 is the token shared with the next sample.
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        const int64_t doc = static_cast<int64_t>(doc_idx[doc_pos]);
        if (doc < 0 || doc >= num_sizes) {
          out_of_range = true;
          break;
        }
        const int64_t doc_length = static_cast<int64_t>(sizes[doc]) - offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          // The sample's last token lies in this document; it is also the next
          // sample's first token, hence the -1.
          offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          if (doc_pos == num_docs - 1) {
            ran_out = true;
            break;
          }
          ++doc_pos;
          offset = 0;
        }
      }
      out[2 * sample] = static_cast<T>(doc_pos);
      out[2 * sample + 1] = static_cast<T>(offset);
    }
  }
  if (out_of_range) throw std::invalid_argument("doc_idx refers to a sequence outside sizes");
  if (ran_out)
    throw std::invalid_argument("documents hold fewer tokens than num_samples * seq_length + 1");
  return result;
}

std::pair<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_indices(
    const py::array_t<double, py::array::c_style | py::array::forcecast> &weights_,
    int64_t size) {
  const int64_t num_datasets = weights_.shape(0);
  if (num_datasets < 1 || num_datasets > 32767)
    throw std::invalid_argument("number of datasets must be in [1, 32767], got " +
                                std::to_string(num_datasets));
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  const double *weights = weights_.data();
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t *ds_index = dataset_index.mutable_data();
  int64_t *ds_sample = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(num_datasets, 0);
    for (int64_t sample = 0; sample < size; ++sample) {
      const double target = sample > 1 ? static_cast<double>(sample) : 1.0;
      int64_t best = 0;
      double best_error = weights[0] * target - static_cast<double>(counts[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = weights[d] * target - static_cast<double>(counts[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      ds_index[sample] = static_cast<int16_t>(best);
      ds_sample[sample] = counts[best];
      ++counts[best];
    }
  }
  return {dataset_index, dataset_sample_index};
}

}  // namespace

PYBIND11_MODULE(_data_helpers, m) {
  m.doc() = "GPT sample-index and blending-index builders (see megatron_msg.data)";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"),
        py::arg("doc_idx"), py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"),
        py::arg("doc_idx"), py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
