// Prints ffi/kbit_format.h's tile addressing for tests/test_tiled.py, which compares it with the order
// QuantizedMatrix stores (jax_kbit/quantized_matrix.py). Reads lines "n nb row b" from stdin and prints, per
// line, block_index(row, b) in row order and in tile order, and block_index(row, 0) + block_offset(b) in
// both (the split the 16-row kernel and the CPU handler use).
#include <cinttypes>
#include <cstdio>

#include "kbit_format.h"

int main() {
  long long n, nb, row, b;
  while (std::scanf("%lld %lld %lld %lld", &n, &nb, &row, &b) == 4) {
    (void)n;
    std::printf("%" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 "\n", kbit::block_index(row, b, nb, false),
                kbit::block_index(row, b, nb, true),
                kbit::block_index(row, 0, nb, false) + kbit::block_offset(b, false),
                kbit::block_index(row, 0, nb, true) + kbit::block_offset(b, true));
  }
  return 0;
}
