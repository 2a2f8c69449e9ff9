// Writes the fuzzer's seed corpus (tests/fuzz/corpus): small valid captures
// of each shape the reader knows, so the fuzzer starts past the checksums.
// Usage: make_capture_corpus DIR
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "tcpscope/capture.hpp"

using namespace tcpscope;
using namespace tcpscope::capture;

namespace {

Event ev(uint64_t i, uint8_t type) {
  Event e;
  std::memset(&e, 0, sizeof(e));
  e.ts_ns = 1'000'000'000 + i * 1'000'000;
  e.conn = 10 + i / 5;
  e.type = type;
  e.family = 4;
  e.old_state = static_cast<uint8_t>(1 + i % 11);
  e.new_state = static_cast<uint8_t>(1 + (i + 1) % 11);
  e.lport = 40000;
  e.rport = 80;
  e.laddr[0] = 127;
  e.laddr[3] = 1;
  e.raddr[0] = 127;
  e.raddr[3] = 1;
  std::strcpy(e.comm, "seed");
  return e;
}

CaptureInfo info() {
  CaptureInfo i;
  i.tcpscope_version = "seed";
  i.host = "h";
  i.kernel = "k";
  i.boot_offset_ns = 1'700'000'000'000'000'000;
  i.start_ns = 1'000'000'000;
  i.capture_id = 42;
  i.options = {{"port", "80"}};
  return i;
}

bool write(const std::string& path, uint64_t n, WriterOptions opt, bool close = true,
           uint64_t ring = 0) {
  CaptureInfo in = info();
  in.ring_bytes = ring;
  if (ring) in.trigger = "SIGUSR1";
  auto w = CaptureWriter::create(path, in, opt);
  if (!w) {
    std::fprintf(stderr, "%s\n", w.error().message.c_str());
    return false;
  }
  for (uint64_t i = 0; i < n; ++i)
    (*w)->append(ev(i, i % 7 == 6 ? TCPSCOPE_EV_RESET_SENT : TCPSCOPE_EV_STATE));
  if (close) {
    Event end{};
    end.type = TCPSCOPE_EV_END;
    end.ts_ns = 9'000'000'000;
    (*w)->append(end);
    return !(*w)->close();
  }
  (*w)->flush();
  return true;  // left open: no end marker (as after kill -9); closed below
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  WriterOptions zstd;
  zstd.block_events = 8;
  WriterOptions raw = zstd;
  raw.codec = Codec::None;
  WriterOptions rot = raw;
  rot.max_size = 64 * 1024;
  rot.block_events = 100;
  bool ok = write(dir + "/zstd.cap", 20, zstd) && write(dir + "/raw.cap", 12, raw) &&
            write(dir + "/empty.cap", 0, raw) && write(dir + "/ring.cap", 5, zstd, true, 65536);
  // Rotation: keep only the small parts' header + end marker shape.
  ok = ok && write(dir + "/rot.cap", 1200, rot);
  // No end marker: cut the end block off a raw capture.
  if (ok) {
    std::ifstream in(dir + "/raw.cap", std::ios::binary);
    std::vector<char> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    b.resize(b.size() - kBlockHeaderSize - 16);
    std::ofstream(dir + "/noend.cap", std::ios::binary)
        .write(b.data(), static_cast<long>(b.size()));
  }
  return ok ? 0 : 1;
}
