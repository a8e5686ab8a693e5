// The recorder's counts of a float32 tensor [rows, channels, positions...] in one pass (detector/spike_counts.py),
// where eager PyTorch needs up to eight tensor operations and as many passes (detector/neurons.py, synapses.py):
//   count_spikes(spikes, bursting)  a neuron's output: spike magnitudes summed over channels at each position and
//                                   per row; in a bursting sleep step also each row's largest magnitude and the
//                                   neurons that fired (non-zero outputs), at each position and per row;
//   count_events(x)                 an input no neuron published: its non-zero elements, at each position and per row;
//   weighted_totals(events, targets)  a synapse's synaptic operations per row where its fan-out differs by position.
//
// Every count is a sum of small integers, exact in float32 below 2**24 (the caller checks the bound; the weighted
// totals in float64), so the order of the additions does not matter and the results equal the eager ones bit for bit.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// What one pass accumulates at each position.
enum class Counts { kMagnitude, kMagnitudePeakFired, kFired };

constexpr int64_t kBlock = 512;  // positions per block: its accumulators (2 KB each) stay in L1 over all channels

template <Counts kWhat>
void count_block(const float* row, int64_t channels, int64_t positions, int64_t begin, int64_t n, float* magnitude,
                 float* peak, float* fired) {
  constexpr bool kMag = kWhat != Counts::kFired;
  constexpr bool kPeak = kWhat == Counts::kMagnitudePeakFired;
  constexpr bool kCountFired = kWhat != Counts::kMagnitude;
  if (kMag) std::fill(magnitude, magnitude + n, 0.f);
  if (kPeak) std::fill(peak, peak + n, 0.f);
  if (kCountFired) std::fill(fired, fired + n, 0.f);
  for (int64_t c = 0; c < channels; ++c) {
    const float* s = row + c * positions + begin;
    for (int64_t p = 0; p < n; ++p) {  // element-wise: the compiler vectorises it
      const float m = s[p] < 0.f ? -s[p] : s[p];
      if (kMag) magnitude[p] += m;
      if (kPeak) peak[p] = m > peak[p] ? m : peak[p];
      if (kCountFired) fired[p] += m != 0.f ? 1.f : 0.f;
    }
  }
}

float total(const float* values, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += values[i];
  return sum;
}

// Positions per channel of a [rows, channels, positions...] tensor, after checking that it is one the kernel takes.
int64_t positions_of(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() >= 2, name,
              " takes a contiguous float32 CPU tensor [rows, channels, ...]");
  const int64_t rows_by_channels = x.size(0) * x.size(1);
  return rows_by_channels ? x.numel() / rows_by_channels : 0;
}

// Fills, per row r, magnitude / fired [rows, positions] and their row totals, and each row's peak (NaN where the
// magnitudes hold a NaN, as amax gives). Returns whether any row has a non-zero (or NaN) peak.
template <Counts kWhat>
bool count_rows(const torch::Tensor& x, int64_t positions, float* magnitude, float* magnitude_rows, float* peak_rows,
                float* fired, float* fired_rows) {
  constexpr bool kMag = kWhat != Counts::kFired;
  constexpr bool kPeak = kWhat == Counts::kMagnitudePeakFired;
  constexpr bool kCountFired = kWhat != Counts::kMagnitude;
  const int64_t rows = x.size(0), channels = x.size(1);
  const float* data = x.data_ptr<float>();
  const int64_t blocks = (positions + kBlock - 1) / kBlock;
  std::vector<float> block_peaks(kPeak ? blocks : 0);
  bool any = false;
  for (int64_t r = 0; r < rows; ++r) {
    float* mag = kMag ? magnitude + r * positions : nullptr;
    float* fir = kCountFired ? fired + r * positions : nullptr;
    const float* row = data + r * channels * positions;
    at::parallel_for(0, blocks, 8, [&](int64_t first, int64_t last) {
      float peak[kBlock];
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * kBlock, n = std::min(kBlock, positions - begin);
        count_block<kWhat>(row, channels, positions, begin, n, kMag ? mag + begin : nullptr, peak,
                           kCountFired ? fir + begin : nullptr);
        if (kPeak) block_peaks[b] = n ? *std::max_element(peak, peak + n) : 0.f;
      }
    });
    if (kMag) magnitude_rows[r] = total(mag, positions);
    if (kCountFired) fired_rows[r] = total(fir, positions);
    if (kPeak) {
      float row_peak = blocks ? *std::max_element(block_peaks.begin(), block_peaks.end()) : 0.f;
      if (std::isnan(magnitude_rows[r])) row_peak = std::numeric_limits<float>::quiet_NaN();  // as amax
      peak_rows[r] = row_peak;
      any = any || !(row_peak == 0.f);
    }
  }
  return any;
}

}  // namespace

// Returns (per_position [rows, positions], per_row [rows], then, bursting: peak [rows], fired_per_position,
// fired_per_row and whether any neuron spiked; not bursting: None, None, None, True).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, bool> count_spikes(
    const torch::Tensor& spikes, bool bursting) {
  const int64_t positions = positions_of(spikes, "count_spikes"), rows = spikes.size(0);
  const auto options = spikes.options();
  torch::Tensor per_position = torch::empty({rows, positions}, options), per_row = torch::empty({rows}, options);
  torch::Tensor peak, fired_per_position, fired_per_row;  // undefined (None) unless bursting
  if (bursting) {
    peak = torch::empty({rows}, options);
    fired_per_position = torch::empty({rows, positions}, options);
    fired_per_row = torch::empty({rows}, options);
  }
  bool any = true;
  {
    pybind11::gil_scoped_release no_gil;  // plain loops over raw buffers: other Python threads may run
    if (bursting)
      any = count_rows<Counts::kMagnitudePeakFired>(spikes, positions, per_position.data_ptr<float>(),
                                                    per_row.data_ptr<float>(), peak.data_ptr<float>(),
                                                    fired_per_position.data_ptr<float>(),
                                                    fired_per_row.data_ptr<float>());
    else
      count_rows<Counts::kMagnitude>(spikes, positions, per_position.data_ptr<float>(), per_row.data_ptr<float>(),
                                     nullptr, nullptr, nullptr);
  }
  return {per_position, per_row, peak, fired_per_position, fired_per_row, any};
}

// Returns (non-zero elements at each position [rows, positions], per row [rows]).
std::tuple<torch::Tensor, torch::Tensor> count_events(const torch::Tensor& x) {
  const int64_t positions = positions_of(x, "count_events"), rows = x.size(0);
  torch::Tensor per_position = torch::empty({rows, positions}, x.options()), per_row = torch::empty({rows}, x.options());
  {
    pybind11::gil_scoped_release no_gil;
    count_rows<Counts::kFired>(x, positions, nullptr, nullptr, nullptr, per_position.data_ptr<float>(),
                               per_row.data_ptr<float>());
  }
  return {per_position, per_row};
}

// Per row, the sum over positions of events [rows, positions] (float32) times targets [positions] (float64). Products
// and sums are integers below 2**53, exact in float64 in any order, as in the eager ``events.double() @ targets`` this
// replaces (two operations and a copy).
torch::Tensor weighted_totals(const torch::Tensor& events, const torch::Tensor& targets) {
  TORCH_CHECK(events.device().is_cpu() && events.scalar_type() == torch::kFloat32 && events.is_contiguous() &&
                  events.dim() == 2,
              "weighted_totals takes contiguous float32 CPU events [rows, positions]");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == torch::kFloat64 && targets.is_contiguous() &&
                  targets.dim() == 1 && targets.size(0) == events.size(1),
              "weighted_totals takes contiguous float64 CPU targets [positions]");
  const int64_t rows = events.size(0), positions = events.size(1);
  torch::Tensor totals = torch::empty({rows}, targets.options());
  {
    pybind11::gil_scoped_release no_gil;
    const float* e = events.data_ptr<float>();
    const double* t = targets.data_ptr<double>();
    double* out = totals.data_ptr<double>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = e + r * positions;
      double sum = 0.0;
      for (int64_t p = 0; p < positions; ++p) sum += static_cast<double>(row[p]) * t[p];
      out[r] = sum;
    }
  }
  return totals;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_spikes", &count_spikes, "A neuron output's spike counts in one pass (see spike_counts.cpp)");
  m.def("count_events", &count_events, "An input's non-zero elements at each position and per row, in one pass");
  m.def("weighted_totals", &weighted_totals, "Synaptic operations per row where the fan-out differs by position");
}
