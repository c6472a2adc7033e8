// A probe, not part of the library: how fast can a batch-1 matmul kernel *read* k-bit weights, depending on
// how they are laid out and walked? It reads the bytes the fused kernel reads (K = 4: 16 bytes per block of
// 32 weights), with the grid the kernel had until the thirteenth session (one 768-thread CTA per SM, warps
// taking (16-row tile, split) items), and does nothing with them but XOR them together, so the figures are
// the memory ceiling of each access pattern:
//   rows64   format v1 rows, a warp step = 16 rows x 4 blocks (64 bytes per row), four steps at a time
//   rows128  format v1 rows, a warp step = 16 rows x 8 blocks (a whole 128-byte line per row)
//   tiled    the same words stored tile by tile, so a warp's whole item is one contiguous run of memory
// A second table asks why the register kernel (since the fourteenth session: weights loaded into a ring of
// four steps, one step refilled after each step's arithmetic) reads format v1 rows at about 2.2 TB/s where
// rows64, whose four steps go out back to back, reaches about 3.4: whether the memory system serves a row's
// 64-byte pieces more slowly when they are requested a step's arithmetic apart than as one 256-byte burst.
// With the library's grid (16 warps a CTA, items dealt round the CTAs), the ring is refilled one step at a
// time (ring1, as the kernel does) or two at a time (ring2: each row's next 128 bytes requested together),
// with a pause of D ns per step (__nanosleep: the arithmetic's time, without taking issue slots); ringT walks
// the tiled layout (as the tiled column of the first table) refilling one step at a time.
// Build and run: nvcc -O3 -arch=sm_90 -o /tmp/probe bench/probe_gemv_access.cu && /tmp/probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "probe_common.cuh"

constexpr int kWarps = 24;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// w: n rows of nb 16-byte blocks (row-major) for kMode 0 / 1; for kMode 2 the same bytes tile-major:
// tile t, then step s (4 blocks), then 32 lanes x 2 pieces (row r0's block, row r1's block).
template <int kMode>
__global__ void __launch_bounds__(kThreads, 1) probe(const uint4* __restrict__ w, int64_t n, int64_t nb,
                                                     int64_t splits, int64_t per_split, uint32_t* out) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int64_t tiles = n / 16;
  uint32_t acc = 0;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); item < tiles * splits;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t tile = item % tiles, split = item / tiles;
    const int64_t begin = split * per_split;
    const int64_t end = begin + per_split < nb ? begin + per_split : nb;
    const int64_t r0 = tile * 16 + g, r1 = r0 + 8;
    if constexpr (kMode == 0) {  // 4 steps of 4 blocks in flight
      for (int64_t b = begin; b < end; b += 16) {
        uint4 v[8];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          v[2 * s] = ld_stream(w + r0 * nb + b + 4 * s + c);
          v[2 * s + 1] = ld_stream(w + r1 * nb + b + 4 * s + c);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc ^= fold(v[i]);
      }
    } else if constexpr (kMode == 1) {  // 2 steps of 8 blocks in flight: same bytes in flight
      for (int64_t b = begin; b < end; b += 16) {
        uint4 v[8];
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            v[4 * s + 2 * h] = ld_stream(w + r0 * nb + b + 8 * s + 4 * h + c);
            v[4 * s + 2 * h + 1] = ld_stream(w + r1 * nb + b + 8 * s + 4 * h + c);
          }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc ^= fold(v[i]);
      }
    } else {  // tiled: step s of tile t is 64 pieces at (t * nb / 4 + s) * 64
      const uint4* base = w + tile * 16 * nb;
      for (int64_t b = begin; b < end; b += 16) {
        uint4 v[8];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const uint4* step = base + (b / 4 + s) * 64;
          v[2 * s] = ld_stream(step + lane);
          v[2 * s + 1] = ld_stream(step + 32 + lane);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc ^= fold(v[i]);
      }
    }
  }
  if (acc == 0x9e3779b9u) atomicAdd(out, 1u);  // keeps the loads alive
}

constexpr int kRingWarps = 16;
constexpr int kRing = 4;

// The register kernel's walk (one split of the reduction per item here): a ring of kRing steps of format v1
// rows, slot i refilled after step i is consumed (kMode 0) or slots i - 1 and i after odd steps (1); kMode 2
// reads the tiled layout one step at a time.
template <int kMode>
__global__ void __launch_bounds__(kRingWarps * 32, 1)
    probe_ring(const uint4* __restrict__ w, int64_t n, int64_t nb, unsigned pause_ns, uint32_t* out) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int64_t tiles = n / 16;
  uint32_t acc = 0;
  for (int64_t tile = static_cast<int64_t>(threadIdx.x >> 5) * gridDim.x + blockIdx.x; tile < tiles;
       tile += static_cast<int64_t>(gridDim.x) * kRingWarps) {
    // Rows: piece s of a row is block 4 s + c. Tiled: step s of the tile is 64 pieces, rows g and g + 8.
    const uint4* p0 = kMode == 2 ? w + tile * 16 * nb + lane : w + (tile * 16 + g) * nb + c;
    const uint4* p1 = kMode == 2 ? p0 + 32 : p0 + 8 * nb;
    constexpr int64_t kPiece = kMode == 2 ? 64 : 4;  // elements of w from one step to the next
    const int64_t steps = nb / 4;
    uint4 v0[kRing], v1[kRing];
#pragma unroll
    for (int i = 0; i < kRing; ++i) {
      if (i < steps) v0[i] = ld_stream(p0 + kPiece * i), v1[i] = ld_stream(p1 + kPiece * i);
    }
    for (int64_t base = 0; base < steps; base += kRing) {
#pragma unroll
      for (int i = 0; i < kRing; ++i) {
        if (base + i >= steps) break;
        acc ^= fold(v0[i]) ^ fold(v1[i]);
        if (pause_ns != 0) __nanosleep(pause_ns);
        if constexpr (kMode != 1) {
          const int64_t next = base + i + kRing;
          if (next < steps) v0[i] = ld_stream(p0 + kPiece * next), v1[i] = ld_stream(p1 + kPiece * next);
        } else if (i % 2 == 1) {
#pragma unroll
          for (int j = i - 1; j <= i; ++j) {
            const int64_t next = base + j + kRing;
            if (next < steps) v0[j] = ld_stream(p0 + 4 * next), v1[j] = ld_stream(p1 + 4 * next);
          }
        }
      }
    }
  }
  if (acc == 0x9e3779b9u) atomicAdd(out, 1u);
}

// The split of cuda_mma.cuh's choose_split (chunk: 16 blocks here, the probe's unit of work).
static void choose(int64_t nb, int64_t tiles, int64_t resident, int64_t chunk, int64_t* splits,
                   int64_t* per) {
  int64_t best = -1;
  for (int64_t s = 1; s <= std::max<int64_t>(1, nb / (2 * chunk)); ++s) {
    const int64_t p = ((nb + s - 1) / s + chunk - 1) / chunk * chunk;
    const int64_t used = (nb + p - 1) / p;
    const int64_t cost = (tiles * used + resident - 1) / resident * (p / chunk);
    if (best < 0 || cost < best) best = cost, *splits = used, *per = p;
  }
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, sms);
  const int64_t shapes[][2] = {{4096, 4096}, {8192, 8192}, {8192, 28672}, {28672, 8192}};  // in x out
  const int64_t max_bytes = 28672LL * 8192 / 2;
  uint4* w;
  uint4* copy;
  uint32_t* out;
  CHECK(cudaMalloc(&w, max_bytes));
  CHECK(cudaMalloc(&copy, max_bytes));
  CHECK(cudaMalloc(&out, 4));
  CHECK(cudaMemset(w, 0x5a, max_bytes));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  auto time = [&](auto&& launch) {
    for (int i = 0; i < 5; ++i) launch();
    CHECK(cudaEventRecord(e0));
    const int reps = 50;
    for (int i = 0; i < reps; ++i) launch();
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    CHECK(cudaGetLastError());
    return ms * 1000.0 / reps;  // us
  };
  const double copy_us = time([&] { CHECK(cudaMemcpyAsync(copy, w, max_bytes, cudaMemcpyDeviceToDevice)); });
  std::printf("copy %lld MB: %.1f us, %.0f GB/s (read + write)\n", (long long)(max_bytes >> 20), copy_us,
              2.0 * max_bytes / copy_us / 1e3);
  std::printf("%12s %6s %7s %9s %9s %9s  (us, GB/s read)\n", "in x out", "splits", "per", "rows64", "rows128",
              "tiled");
  for (auto& s : shapes) {
    const int64_t in = s[0], n = s[1], nb = in / 32, bytes = n * nb * 16;
    int64_t splits = 1, per = nb;
    choose(nb, n / 16, int64_t(sms) * kWarps, 16, &splits, &per);
    double us[3];
    us[0] = time([&] { probe<0><<<sms, kThreads>>>(w, n, nb, splits, per, out); });
    us[1] = time([&] { probe<1><<<sms, kThreads>>>(w, n, nb, splits, per, out); });
    us[2] = time([&] { probe<2><<<sms, kThreads>>>(w, n, nb, splits, per, out); });
    std::printf("%5lldx%-6lld %6lld %7lld", (long long)in, (long long)n, (long long)splits, (long long)per);
    for (double u : us) std::printf(" %5.1f/%-4.0f", u, bytes / u / 1e3);
    std::printf("\n");
  }
  // The register kernel's walk, on the shapes where the library takes one split (8192 x 28672: the output's
  // tiles fill at least half the resident warps; the others split the reduction, which this walk does not).
  const unsigned pauses[] = {0, 100, 200, 400};
  std::printf("\nring of %d steps, %d warps a CTA, one item per 16 rows (us, GB/s read)\n%12s", kRing,
              kRingWarps, "in x out");
  for (unsigned p : pauses) std::printf("  ring1 %3uns ring2 %3uns ringT %3uns", p, p, p);
  std::printf("\n");
  for (auto& s : shapes) {
    const int64_t in = s[0], n = s[1], nb = in / 32, bytes = n * nb * 16;
    if (2 * (n / 16) < int64_t(sms) * kRingWarps) continue;
    const unsigned ctas = static_cast<unsigned>(std::min<int64_t>(sms, n / 16));
    std::printf("%5lldx%-6lld", (long long)in, (long long)n);
    for (unsigned p : pauses) {
      const double a = time([&] { probe_ring<0><<<ctas, kRingWarps * 32>>>(w, n, nb, p, out); });
      const double b = time([&] { probe_ring<1><<<ctas, kRingWarps * 32>>>(w, n, nb, p, out); });
      const double c = time([&] { probe_ring<2><<<ctas, kRingWarps * 32>>>(w, n, nb, p, out); });
      std::printf("  %5.1f/%-4.0f %5.1f/%-4.0f %5.1f/%-4.0f", a, bytes / a / 1e3, b, bytes / b / 1e3, c,
                  bytes / c / 1e3);
    }
    std::printf("\n");
  }
  return 0;
}
