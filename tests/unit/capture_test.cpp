// Capture format: round trip, every corruption kind, truncation at every
// offset, rotation, file mode, disk full; flight recorder ring and triggers.
#include "tcpscope/capture.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/recorder.hpp"

namespace tcpscope {
namespace {

namespace fs = std::filesystem;
using capture::CaptureInfo;
using capture::CaptureReader;
using capture::CaptureWriter;
using capture::Codec;
using capture::ReadStatus;
using capture::WriterOptions;

// A private temporary directory, removed with its content.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "tcpscope-capture-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// Deterministic, varied events: every byte of the record matters.
Event make_event(uint64_t i) {
  Event e;
  std::memset(&e, 0, sizeof(e));
  e.ts_ns = 1'000'000'000ull + i * 1'000'003ull;
  e.conn = 1000 + i / 6;
  e.sk = 0xffff888000000000ull + (i / 6) * 64;
  e.cgroup = 77;
  e.netns = 4026531840u;
  e.pid = static_cast<uint32_t>(100 + i % 7);
  e.type = static_cast<uint8_t>(i % 11 == 10 ? TCPSCOPE_EV_RETRANSMIT : TCPSCOPE_EV_STATE);
  e.family = 4;
  e.old_state = static_cast<uint8_t>(1 + i % 11);
  e.new_state = static_cast<uint8_t>(1 + (i + 1) % 11);
  e.lport = static_cast<uint16_t>(40000 + i % 100);
  e.rport = 80;
  e.laddr[0] = 10;
  e.laddr[3] = 1;
  e.raddr[0] = 10;
  e.raddr[3] = static_cast<uint8_t>(i);
  std::snprintf(e.comm, sizeof(e.comm), "proc%llu", static_cast<unsigned long long>(i % 13));
  return e;
}

CaptureInfo make_info() {
  CaptureInfo info;
  info.tcpscope_version = "9.9.9";
  info.host = "testhost";
  info.kernel = "6.18.0-test";
  info.boot_offset_ns = 1'700'000'000'000'000'000ll;
  info.start_ns = 999'000'000;
  info.options = {{"netns", "4026531840"}, {"port", "80"}};
  return info;
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Writes events [0, n) with the given options; returns the writer's count.
uint64_t write_capture(const std::string& path, uint64_t n, WriterOptions opt = {},
                       CaptureInfo info = make_info()) {
  auto w = CaptureWriter::create(path, std::move(info), opt);
  EXPECT_TRUE(w.ok()) << (w.ok() ? "" : w.error().message);
  if (!w.ok()) return 0;
  for (uint64_t i = 0; i < n; ++i) EXPECT_TRUE((*w)->append(make_event(i)));
  EXPECT_FALSE((*w)->close().has_value());
  return (*w)->records();
}

struct ReadAll {
  std::vector<Event> events;
  ReadStatus status;
};
ReadAll read_all(CaptureReader& r) {
  ReadAll out;
  Event e;
  while (r.next(e)) {
    out.events.push_back(e);
    if (out.events.size() > 10'000'000) break;  // never: guards a runaway reader
  }
  out.status = r.status();
  return out;
}

bool same(const Event& a, const Event& b) { return std::memcmp(&a, &b, sizeof(Event)) == 0; }

// Events equal make_event(0..n).
::testing::AssertionResult is_prefix(const std::vector<Event>& got, size_t n) {
  if (got.size() != n) return ::testing::AssertionFailure() << got.size() << " records, want " << n;
  for (size_t i = 0; i < n; ++i)
    if (!same(got[i], make_event(i)))
      return ::testing::AssertionFailure() << "record " << i << " differs";
  return ::testing::AssertionSuccess();
}

// Hand-built block, for corruptions the writer never makes.
std::vector<uint8_t> block(uint8_t kind, uint8_t codec, uint16_t flags,
                           const std::vector<uint8_t>& payload, uint32_t raw_len, uint32_t count,
                           bool good_crc = true) {
  std::vector<uint8_t> b(capture::kBlockHeaderSize);
  const uint32_t magic = capture::kBlockMagic;
  const auto stored = static_cast<uint32_t>(payload.size());
  std::memcpy(b.data(), &magic, 4);
  b[4] = kind;
  b[5] = codec;
  std::memcpy(b.data() + 6, &flags, 2);
  std::memcpy(b.data() + 8, &stored, 4);
  std::memcpy(b.data() + 12, &raw_len, 4);
  std::memcpy(b.data() + 16, &count, 4);
  uLong c = crc32(0, b.data(), 20);
  c = crc32(c, payload.data(), static_cast<uInt>(payload.size()));
  auto c32 = static_cast<uint32_t>(c) ^ (good_crc ? 0u : 1u);
  std::memcpy(b.data() + 20, &c32, 4);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}
std::vector<uint8_t> events_payload(uint64_t from, uint64_t n, size_t size = sizeof(Event)) {
  std::vector<uint8_t> p;
  for (uint64_t i = from; i < from + n; ++i) {
    const Event e = make_event(i);
    const auto* b = reinterpret_cast<const uint8_t*>(&e);
    p.insert(p.end(), b, b + std::min(size, sizeof(Event)));
    p.resize(p.size() + (size > sizeof(Event) ? size - sizeof(Event) : 0), 0xee);
  }
  return p;
}
std::vector<uint8_t> end_block(uint16_t flags = 0) {
  return block(2, 0, flags, std::vector<uint8_t>(16, 0), 16, 0);
}
std::vector<uint8_t> cat(std::vector<uint8_t> a, const std::vector<uint8_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Result<std::unique_ptr<CaptureReader>> from(const std::vector<uint8_t>& b) {
  return CaptureReader::from_memory(b.data(), b.size());
}

// ---- round trip --------------------------------------------------------------

TEST(Capture, RoundTripZstdAndRaw) {
  for (Codec codec : {Codec::Zstd, Codec::None}) {
    TempDir dir;
    const std::string path = dir.file("c.cap");
    WriterOptions opt;
    opt.codec = codec;
    opt.block_events = 100;  // several blocks, the last one partial
    ASSERT_EQ(write_capture(path, 1234, opt), 1234u);
    auto r = CaptureReader::open(path);
    ASSERT_TRUE(r.ok()) << r.error().message;
    const CaptureInfo& info = (*r)->info();
    EXPECT_EQ(info.tcpscope_version, "9.9.9");
    EXPECT_EQ(info.host, "testhost");
    EXPECT_EQ(info.kernel, "6.18.0-test");
    EXPECT_EQ(info.boot_offset_ns, 1'700'000'000'000'000'000ll);
    EXPECT_EQ(info.start_ns, 999'000'000u);
    EXPECT_EQ(info.event_size, sizeof(Event));
    EXPECT_EQ(capture::option(info, "port"), "80");
    EXPECT_EQ(info.options.size(), 2u);
    auto all = read_all(**r);
    EXPECT_TRUE(is_prefix(all.events, 1234));
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean) << all.status.message();
    EXPECT_EQ(all.status.blocks, 13u + 1);  // 13 event blocks + end marker
    EXPECT_TRUE(all.status.message().empty());
  }
}

TEST(Capture, ZstdCompresses) {
  TempDir dir;
  write_capture(dir.file("z"), 5000);
  WriterOptions raw;
  raw.codec = Codec::None;
  write_capture(dir.file("r"), 5000, raw);
  EXPECT_LT(fs::file_size(dir.file("z")) * 3, fs::file_size(dir.file("r")));
}

TEST(Capture, EmptyCaptureIsValid) {
  TempDir dir;
  write_capture(dir.file("e"), 0);
  auto r = CaptureReader::open(dir.file("e"));
  ASSERT_TRUE(r.ok());
  auto all = read_all(**r);
  EXPECT_TRUE(all.events.empty());
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean);
}

// The same records through the pipeline give byte-identical JSON, whether
// they come straight or through a capture.
std::string pipeline_json(const std::vector<Event>& events, int64_t offset) {
  fmt::memory_buffer sink_out;
  TempDir dir;
  const std::string out_path = dir.file("out");
  const int fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  {
    FdWriter out(fd);
    TimeFormatter time(offset);
    JsonLinesSink json(out, time);
    Pipeline p;
    p.add_default_analyzers();
    p.add_sink(&json);
    for (const Event& e : events) p.process(e);
    p.finish(0);
  }
  ::close(fd);
  auto b = read_bytes(out_path);
  return {b.begin(), b.end()};
}

TEST(Capture, ReportFromCaptureEqualsLive) {
  // A little connection story: open, close, TIME_WAIT, a reset, lost events.
  std::vector<Event> evs;
  auto st = [&](uint64_t ts, uint64_t conn, uint8_t o, uint8_t n, uint8_t flags = 0) {
    Event e = make_event(0);
    e.type = TCPSCOPE_EV_STATE;
    e.ts_ns = ts;
    e.conn = conn;
    e.old_state = o;
    e.new_state = n;
    e.sk_flags = flags;
    evs.push_back(e);
  };
  for (uint64_t c = 1; c <= 50; ++c) {
    const uint64_t t = c * 10'000'000;
    st(t, c, kTcpClose, kTcpSynSent);
    st(t + 1000, c, kTcpSynSent, kTcpEstablished);
    st(t + 2000, c, kTcpEstablished, kTcpFinWait1);
    st(t + 3000, c, kTcpFinWait1, kTcpFinWait2);
    st(t + 4000, c, kTcpFinWait2, kTcpClose, c % 2 ? TCPSCOPE_SK_SEND_SHUTDOWN : 0);
  }
  Event lost{};
  lost.type = TCPSCOPE_EV_LOST;
  lost.ts_ns = 600'000'000;
  lost.conn = 3;
  evs.push_back(lost);
  Event end{};
  end.type = TCPSCOPE_EV_END;
  end.ts_ns = 700'000'000;
  evs.push_back(end);

  TempDir dir;
  {
    auto w = CaptureWriter::create(dir.file("c"), make_info(), {});
    ASSERT_TRUE(w.ok());
    for (const Event& e : evs) (*w)->append(e);
    ASSERT_FALSE((*w)->close());
  }
  auto r = CaptureReader::open(dir.file("c"));
  ASSERT_TRUE(r.ok());
  auto all = read_all(**r);
  ASSERT_EQ(all.events.size(), evs.size());
  const int64_t offset = (*r)->info().boot_offset_ns;
  const std::string live = pipeline_json(evs, make_info().boot_offset_ns);
  const std::string replay = pipeline_json(all.events, offset);
  EXPECT_FALSE(live.empty());
  EXPECT_EQ(live, replay);
}

// ---- file mode, flushing --------------------------------------------------------

TEST(Capture, CreatedWithMode0600) {
  TempDir dir;
  const std::string path = dir.file("m.cap");
  const mode_t old = umask(0);
  write_capture(path, 10);
  umask(old);
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  // An existing file with a wider mode is narrowed too.
  ASSERT_EQ(chmod(path.c_str(), 0644), 0);
  write_capture(path, 10);
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST(Capture, RefusesSymlink) {
  TempDir dir;
  write_bytes(dir.file("target"), {1, 2, 3});
  fs::create_symlink(dir.file("target"), dir.file("link"));
  auto w = CaptureWriter::create(dir.file("link"), make_info(), {});
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.error().message.find("symbolic link"), std::string::npos) << w.error().message;
  EXPECT_EQ(read_bytes(dir.file("target")).size(), 3u);
}

TEST(Capture, TickFlushesWhatAKillWouldOtherwiseLose) {
  TempDir dir;
  const std::string path = dir.file("t.cap");
  WriterOptions opt;
  opt.flush_interval_ns = 1'000'000'000;
  auto w = CaptureWriter::create(path, make_info(), opt);
  ASSERT_TRUE(w.ok());
  CaptureWriter& wr = **w;
  wr.tick(10'000'000'000);  // nothing pending: starts the interval
  for (int i = 0; i < 10; ++i) wr.append(make_event(i));
  wr.tick(10'500'000'000);  // too early
  {
    auto r = CaptureReader::open(path);
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE(read_all(**r).events.empty());
  }
  wr.tick(11'000'000'000);
  // As if killed now: the file on disk already holds every record.
  auto r = CaptureReader::open(path);
  ASSERT_TRUE(r.ok());
  auto all = read_all(**r);
  EXPECT_TRUE(is_prefix(all.events, 10));
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::NoEnd);
  EXPECT_NE(all.status.message().find("no end marker"), std::string::npos);
}

// ---- rotation ----------------------------------------------------------------

TEST(Capture, RotatesToNumberedPartsAndReadsThemAll) {
  TempDir dir;
  const std::string path = dir.file("rot.cap");
  WriterOptions opt;
  opt.codec = Codec::None;  // predictable sizes
  opt.block_events = 50;    // 6400-byte blocks
  opt.max_size = 64 * 1024;
  auto w = CaptureWriter::create(path, make_info(), opt);
  ASSERT_TRUE(w.ok());
  for (int i = 0; i < 3000; ++i) ASSERT_TRUE((*w)->append(make_event(i)));
  ASSERT_FALSE((*w)->close());
  const uint32_t last = (*w)->part();
  EXPECT_GE(last, 4u);
  for (uint32_t p = 0; p <= last; ++p) {
    const std::string part = capture::part_path(path, p);
    ASSERT_TRUE(fs::exists(part)) << part;
    EXPECT_LE(fs::file_size(part), opt.max_size) << part;
    struct stat st {};
    stat(part.c_str(), &st);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
  EXPECT_FALSE(fs::exists(capture::part_path(path, last + 1)));

  auto r = CaptureReader::open(path);
  ASSERT_TRUE(r.ok());
  auto all = read_all(**r);
  EXPECT_TRUE(is_prefix(all.events, 3000));
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean) << all.status.message();
  EXPECT_EQ(all.status.parts, last + 1);

  // Without following, the first part alone.
  auto one = CaptureReader::open(path, false);
  ASSERT_TRUE(one.ok());
  auto first = read_all(**one);
  EXPECT_GT(first.events.size(), 0u);
  EXPECT_LT(first.events.size(), 3000u);

  // Starting from a later part reads on to the end.
  auto mid = CaptureReader::open(capture::part_path(path, 2));
  ASSERT_TRUE(mid.ok());
  EXPECT_EQ((*mid)->info().part, 2u);
  auto rest = read_all(**mid);
  EXPECT_EQ(rest.status.kind, ReadStatus::Kind::Clean);
  ASSERT_FALSE(rest.events.empty());
  EXPECT_TRUE(same(rest.events.back(), make_event(2999)));

  // A missing part stops the reader with a clear message.
  fs::remove(capture::part_path(path, 3));
  auto gap = CaptureReader::open(path);
  ASSERT_TRUE(gap.ok());
  auto cut = read_all(**gap);
  EXPECT_EQ(cut.status.kind, ReadStatus::Kind::Truncated);
  EXPECT_NE(cut.status.message().find("rot.cap.3"), std::string::npos) << cut.status.message();
  EXPECT_TRUE(is_prefix(cut.events, cut.events.size()));
}

TEST(Capture, MaxFilesKeepsTheNewestParts) {
  TempDir dir;
  const std::string path = dir.file("keep.cap");
  WriterOptions opt;
  opt.codec = Codec::None;
  opt.block_events = 50;
  opt.max_size = 64 * 1024;
  opt.max_files = 2;
  auto w = CaptureWriter::create(path, make_info(), opt);
  ASSERT_TRUE(w.ok());
  for (int i = 0; i < 3000; ++i) (*w)->append(make_event(i));
  ASSERT_FALSE((*w)->close());
  const uint32_t last = (*w)->part();
  ASSERT_GE(last, 3u);
  int present = 0;
  for (uint32_t p = 0; p <= last; ++p) present += fs::exists(capture::part_path(path, p));
  EXPECT_EQ(present, 2);
  EXPECT_TRUE(fs::exists(capture::part_path(path, last)));
  EXPECT_TRUE(fs::exists(capture::part_path(path, last - 1)));
}

TEST(Capture, PartOfAnotherCaptureIsRejected) {
  TempDir dir;
  WriterOptions opt;
  opt.codec = Codec::None;
  opt.block_events = 50;
  opt.max_size = 64 * 1024;
  write_capture(dir.file("a"), 1500, opt);
  write_capture(dir.file("b"), 1500, opt);
  fs::copy_file(dir.file("b.1"), dir.file("a.1"), fs::copy_options::overwrite_existing);
  auto r = CaptureReader::open(dir.file("a"));
  ASSERT_TRUE(r.ok());
  auto all = read_all(**r);
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::Corrupt);
  EXPECT_NE(all.status.message().find("not part 1"), std::string::npos) << all.status.message();
}

// ---- truncation -------------------------------------------------------------------

TEST(Capture, TruncatedAtEveryOffset) {
  for (Codec codec : {Codec::None, Codec::Zstd}) {
    TempDir dir;
    const std::string path = dir.file("full");
    WriterOptions opt;
    opt.codec = codec;
    opt.block_events = 3;
    write_capture(path, 10, opt);  // blocks of 3, 3, 3, 1, then the end marker
    const auto bytes = read_bytes(path);
    const size_t header = capture::encode_header(make_info()).size();
    // Block boundaries: where each block ends, and the records before it.
    std::vector<std::pair<size_t, size_t>> ends;  // (end offset, records)
    {
      size_t off = header, recs = 0;
      while (off + capture::kBlockHeaderSize <= bytes.size()) {
        uint32_t stored, count;
        std::memcpy(&stored, bytes.data() + off + 8, 4);
        std::memcpy(&count, bytes.data() + off + 16, 4);
        off += capture::kBlockHeaderSize + stored;
        recs += count;
        ends.emplace_back(off, recs);
      }
      ASSERT_EQ(off, bytes.size());
      ASSERT_EQ(ends.size(), 5u);
    }
    for (size_t len = 0; len <= bytes.size(); ++len) {
      SCOPED_TRACE("length " + std::to_string(len));
      const std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<long>(len));
      auto r = from(cut);
      if (len < header) {
        ASSERT_FALSE(r.ok());
        EXPECT_FALSE(r.error().message.empty());
        continue;
      }
      ASSERT_TRUE(r.ok()) << r.error().message;
      auto all = read_all(**r);
      size_t want = 0;
      bool at_boundary = len == header;
      for (auto [end, recs] : ends) {
        if (end <= len) want = recs;
        if (end == len) at_boundary = true;
      }
      EXPECT_TRUE(is_prefix(all.events, want));
      if (len == bytes.size()) {
        EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean);
      } else if (at_boundary) {
        EXPECT_EQ(all.status.kind, ReadStatus::Kind::NoEnd);
      } else {
        EXPECT_EQ(all.status.kind, ReadStatus::Kind::Truncated);
        EXPECT_GT(all.status.skipped, 0u);
        EXPECT_EQ(all.status.offset + all.status.skipped, len);
        EXPECT_NE(all.status.message().find("truncated"), std::string::npos);
      }
    }
  }
}

// ---- corruption -----------------------------------------------------------------

class Corrupt : public ::testing::Test {
 protected:
  void SetUp() override {
    WriterOptions opt;
    opt.codec = Codec::None;
    opt.block_events = 4;
    write_capture(dir_.file("good"), 10, opt);
    good_ = read_bytes(dir_.file("good"));
    header_ = capture::encode_header(make_info()).size();
  }
  std::vector<uint8_t> header() const {
    return {good_.begin(), good_.begin() + static_cast<long>(header_)};
  }
  ReadAll read(const std::vector<uint8_t>& b) {
    auto r = from(b);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    if (!r.ok()) return {};
    return read_all(**r);
  }
  std::string open_error(const std::vector<uint8_t>& b) {
    auto r = from(b);
    return r.ok() ? std::string() : r.error().message;
  }

  TempDir dir_;
  std::vector<uint8_t> good_;
  size_t header_ = 0;
};

TEST_F(Corrupt, BadMagic) {
  auto b = good_;
  b[0] = 'X';
  EXPECT_NE(open_error(b).find("not a tcpscope capture"), std::string::npos);
  EXPECT_NE(open_error({'h', 'e', 'l', 'l', 'o'}).find("not a tcpscope capture"),
            std::string::npos);
  EXPECT_NE(open_error({}).find("empty"), std::string::npos);
  // A text file, and a file that only starts right.
  const std::string text = "{\"type\":\"start\"}\n";
  EXPECT_NE(open_error({text.begin(), text.end()}).find("bad magic"), std::string::npos);
  EXPECT_NE(open_error({good_.begin(), good_.begin() + 10}).find("truncated"), std::string::npos);
}

TEST_F(Corrupt, WrongVersion) {
  for (uint16_t v : {uint16_t{0}, uint16_t{2}, uint16_t{0xffff}}) {
    auto b = good_;
    std::memcpy(b.data() + 8, &v, 2);
    const std::string err = open_error(b);
    EXPECT_NE(err.find("format version " + std::to_string(v)), std::string::npos) << err;
  }
}

TEST_F(Corrupt, HeaderLies) {
  {  // metadata length beyond the limit
    auto b = good_;
    const uint32_t len = 0xffffffff;
    std::memcpy(b.data() + 12, &len, 4);
    EXPECT_NE(open_error(b).find("metadata length"), std::string::npos);
  }
  {  // metadata length beyond the file
    auto b = header();
    const uint32_t len = 60000;
    std::memcpy(b.data() + 12, &len, 4);
    EXPECT_NE(open_error(b).find("truncated"), std::string::npos);
  }
  {  // a flipped metadata byte
    auto b = good_;
    b[20] ^= 0x40;
    EXPECT_NE(open_error(b).find("checksum"), std::string::npos);
  }
  {  // valid checksum, lying TLV length
    CaptureInfo info = make_info();
    auto h = capture::encode_header(info);
    const uint32_t lie = 1'000'000;
    std::memcpy(h.data() + 16 + 2, &lie, 4);  // first entry's length
    const uint32_t c = static_cast<uint32_t>(crc32(0, h.data(), static_cast<uInt>(h.size() - 4)));
    std::memcpy(h.data() + h.size() - 4, &c, 4);
    EXPECT_NE(open_error(h).find("claims"), std::string::npos) << open_error(h);
  }
  {  // absurd record size
    CaptureInfo info = make_info();
    info.event_size = 3;
    auto h = capture::encode_header(info);
    EXPECT_NE(open_error(h).find("record size"), std::string::npos) << open_error(h);
  }
}

TEST_F(Corrupt, BadBlockChecksum) {
  // Flip a byte inside the second block's payload.
  auto b = good_;
  const size_t second = header_ + capture::kBlockHeaderSize + 4 * sizeof(Event);
  b[second + capture::kBlockHeaderSize + 5] ^= 1;
  auto all = read(b);
  EXPECT_TRUE(is_prefix(all.events, 4));
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::Corrupt);
  EXPECT_EQ(all.status.offset, second);
  EXPECT_EQ(all.status.skipped, b.size() - second);
  EXPECT_NE(all.status.message().find("checksum mismatch"), std::string::npos);
  EXPECT_NE(all.status.message().find("skipped the last"), std::string::npos);
}

TEST_F(Corrupt, LyingBlockLengths) {
  auto h = header();
  {  // stored length over the limit
    auto b = cat(h, block(1, 0, 0, events_payload(0, 2), 2 * sizeof(Event), 2));
    const uint32_t huge = 0xfffffff0;
    std::memcpy(b.data() + header_ + 8, &huge, 4);
    auto all = read(b);
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Corrupt);
    EXPECT_NE(all.status.detail.find("over the limit"), std::string::npos);
  }
  {  // stored length past the end of the file
    auto b = cat(h, block(1, 0, 0, events_payload(0, 2), 2 * sizeof(Event), 2));
    const uint32_t more = 1'000'000;
    std::memcpy(b.data() + header_ + 8, &more, 4);
    auto all = read(b);
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Truncated);
    EXPECT_TRUE(all.events.empty());
  }
  // Valid checksums, inconsistent counts: never trust count * size.
  for (auto [raw, count] :
       std::vector<std::pair<uint32_t, uint32_t>>{{2 * sizeof(Event), 3},
                                                  {3 * sizeof(Event), 2},
                                                  {0, 0},
                                                  {0xffffffffu, 0x7fffffffu},
                                                  {capture::kMaxBlockRaw + sizeof(Event), 0}}) {
    auto b = cat(h, block(1, 0, 0, events_payload(0, 2), raw, count));
    auto all = read(b);
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Corrupt) << raw << " " << count;
    EXPECT_TRUE(all.events.empty());
  }
  {  // zstd block that claims more than it decompresses to
    auto b = cat(h, block(1, 1, 0, events_payload(0, 2), 4 * sizeof(Event), 4));
    auto all = read(b);
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Corrupt);
    EXPECT_NE(all.status.detail.find("zstd"), std::string::npos) << all.status.detail;
  }
}

TEST_F(Corrupt, GarbageAfterHeaderAndAfterEnd) {
  std::mt19937 rng(42);
  std::vector<uint8_t> junk(5000);
  for (auto& c : junk) c = static_cast<uint8_t>(rng());
  auto all = read(cat(header(), junk));
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::Corrupt);
  EXPECT_NE(all.status.detail.find("magic"), std::string::npos);
  EXPECT_EQ(all.status.skipped, junk.size());

  auto tail = read(cat(good_, junk));
  EXPECT_TRUE(is_prefix(tail.events, 10));
  EXPECT_EQ(tail.status.kind, ReadStatus::Kind::Corrupt);
  EXPECT_NE(tail.status.detail.find("after the end marker"), std::string::npos);
}

TEST_F(Corrupt, UnknownCodecAndUnknownBlockKind) {
  auto h = header();
  auto codec = read(cat(h, block(1, 9, 0, events_payload(0, 1), sizeof(Event), 1)));
  EXPECT_EQ(codec.status.kind, ReadStatus::Kind::Corrupt);
  EXPECT_NE(codec.status.detail.find("codec"), std::string::npos);

  // A block kind from a newer tcpscope, with a valid checksum, is skipped.
  auto b = cat(h, block(1, 0, 0, events_payload(0, 2), 2 * sizeof(Event), 2));
  b = cat(b, block(77, 0, 0, {1, 2, 3}, 3, 0));
  b = cat(b, block(1, 0, 0, events_payload(2, 1), sizeof(Event), 1));
  b = cat(b, end_block());
  auto all = read(b);
  EXPECT_TRUE(is_prefix(all.events, 3));
  EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean);
  EXPECT_EQ(all.status.unknown_blocks, 1u);
}

TEST_F(Corrupt, OlderShorterAndNewerLongerRecords) {
  for (size_t size : {size_t{120}, sizeof(Event) + 16}) {
    if (size == sizeof(Event)) continue;
    CaptureInfo info = make_info();
    info.event_size = static_cast<uint32_t>(size);
    auto b = capture::encode_header(info);
    b = cat(b, block(1, 0, 0, events_payload(0, 3, size), static_cast<uint32_t>(3 * size), 3));
    b = cat(b, end_block());
    auto all = read(b);
    ASSERT_EQ(all.events.size(), 3u);
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean);
    for (size_t i = 0; i < 3; ++i) {
      Event want = make_event(i);
      if (size < sizeof(Event))
        std::memset(reinterpret_cast<uint8_t*>(&want) + size, 0, sizeof(Event) - size);
      EXPECT_TRUE(same(all.events[i], want)) << size << " " << i;
    }
  }
}

// Any single flipped byte: an error or a clean stop, records only from the
// good prefix, never a crash.
TEST_F(Corrupt, EveryFlippedByte) {
  WriterOptions opt;
  opt.block_events = 4;
  write_capture(dir_.file("z"), 10, opt);  // zstd this time
  for (const auto& original : {good_, read_bytes(dir_.file("z"))}) {
    for (size_t i = 0; i < original.size(); ++i) {
      auto b = original;
      b[i] ^= 0x5a;
      auto r = from(b);
      if (!r.ok()) {
        EXPECT_LT(i, header_) << "only header damage may fail the open";
        continue;
      }
      auto all = read_all(**r);
      EXPECT_TRUE(is_prefix(all.events, all.events.size())) << "byte " << i;
      EXPECT_NE(all.status.kind, ReadStatus::Kind::Clean) << "byte " << i;
    }
  }
}

TEST(Capture, NotARegularFile) {
  auto r = CaptureReader::open("/dev/null");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("not a regular file"), std::string::npos);
  auto m = CaptureReader::open("/nonexistent/x.cap");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.error().message.find("No such file"), std::string::npos);
}

// ---- disk full ----------------------------------------------------------------------

// RLIMIT_FSIZE makes write() fail with EFBIG exactly as a full disk fails
// with ENOSPC, without needing root or a small file system.
TEST(Capture, DiskFullLeavesAValidFile) {
  // Small blocks; and one block larger than the space left, which is then
  // salvaged in smaller pieces.
  for (uint32_t block_events : {64u, 4096u}) {
    SCOPED_TRACE("block_events " + std::to_string(block_events));
    TempDir dir;
    const std::string path = dir.file("full.cap");
    int pipefd[2];
    ASSERT_EQ(pipe(pipefd), 0);
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      signal(SIGXFSZ, SIG_IGN);
      rlimit lim{100'000, 100'000};
      setrlimit(RLIMIT_FSIZE, &lim);
      WriterOptions opt;
      opt.codec = Codec::None;
      opt.block_events = block_events;
      auto w = CaptureWriter::create(path, make_info(), opt);
      if (!w.ok()) _exit(2);
      uint64_t i = 0;
      while ((*w)->append(make_event(i))) ++i;
      (*w)->close();
      const std::string msg = (*w)->error() ? (*w)->error()->message : "";
      uint64_t recs = (*w)->records();
      if (write(pipefd[1], &recs, sizeof(recs)) != sizeof(recs)) _exit(3);
      if (write(pipefd[1], msg.data(), msg.size()) < 0) _exit(3);
      _exit(0);
    }
    close(pipefd[1]);
    uint64_t recs = 0;
    ASSERT_EQ(read(pipefd[0], &recs, sizeof(recs)), static_cast<ssize_t>(sizeof(recs)));
    char buf[512] = {};
    ASSERT_GT(read(pipefd[0], buf, sizeof(buf) - 1), 0);
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    const std::string msg = buf;
    EXPECT_NE(msg.find("File too large"), std::string::npos) << msg;
    EXPECT_NE(msg.find("valid up to record " + std::to_string(recs)), std::string::npos) << msg;

    EXPECT_LE(fs::file_size(path), 100'000u);
    auto r = CaptureReader::open(path);
    ASSERT_TRUE(r.ok());
    auto all = read_all(**r);
    EXPECT_GT(recs, 0u);
    EXPECT_TRUE(is_prefix(all.events, recs));
    // Within a block of the limit: little is lost.
    EXPECT_GT(recs * sizeof(Event), 100'000u - 64 * (sizeof(Event) + 64));
    // The end marker fits once the partial block is cut off.
    EXPECT_EQ(all.status.kind, ReadStatus::Kind::Clean) << all.status.message();
  }
}

// ---- flight recorder --------------------------------------------------------------------

// Resident memory of this process, bytes (/proc/self/statm).
uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

// A large ring costs memory as records fill it, not at its creation (it
// was zeroed whole at the start: seconds and all of its size for --ring 8G).
TEST(FlightRing, TakesMemoryAsItFills) {
  const uint64_t before = resident_bytes();
  EventRing ring((1u << 30) / sizeof(Event));  // 1 GiB
  for (uint64_t i = 0; i < 1000; ++i) ring.push(make_event(i));
  EXPECT_LT(resident_bytes(), before + (64u << 20));
  EXPECT_EQ(ring.size(), 1000u);
  std::vector<uint64_t> seen;
  ring.for_each([&](const Event& e) { seen.push_back(e.ts_ns); });
  ASSERT_EQ(seen.size(), 1000u);
  EXPECT_EQ(seen.front(), make_event(0).ts_ns);
  EXPECT_EQ(seen.back(), make_event(999).ts_ns);
}

TEST(FlightRing, KeepsTheLastCapacityInOrder) {
  EventRing ring(5);
  std::vector<uint64_t> seen;
  for (uint64_t i = 0; i < 3; ++i) ring.push(make_event(i));
  ring.for_each([&](const Event& e) { seen.push_back(e.ts_ns); });
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_FALSE(ring.wrapped());
  for (uint64_t i = 3; i < 13; ++i) ring.push(make_event(i));
  seen.clear();
  ring.for_each([&](const Event& e) { seen.push_back(e.ts_ns); });
  ASSERT_EQ(seen.size(), 5u);
  EXPECT_TRUE(ring.wrapped());
  for (size_t k = 0; k < 5; ++k) EXPECT_EQ(seen[k], make_event(8 + k).ts_ns);
}

Event state_ev(uint64_t ts, uint64_t conn, uint8_t o, uint8_t n, uint8_t sk_flags = 0) {
  Event e{};
  e.type = TCPSCOPE_EV_STATE;
  e.ts_ns = ts;
  e.conn = conn;
  e.old_state = o;
  e.new_state = n;
  e.sk_flags = sk_flags;
  return e;
}
constexpr uint64_t kSec = 1'000'000'000;

Event config_ev(uint64_t aux, uint32_t close_wait_ms = 0) {
  Event e{};
  e.type = TCPSCOPE_EV_CONFIG;
  e.ts_ns = kSec;
  e.aux = aux;
  e.tx_queue = close_wait_ms;
  return e;
}

// A state or tw-timer record on the tuple 10.0.0.1:lport -> 10.0.0.2:80.
Event on_tuple(Event e, uint16_t lport) {
  e.family = 4;
  e.lport = lport;
  e.rport = 80;
  const uint8_t l[4] = {10, 0, 0, 1}, r[4] = {10, 0, 0, 2};
  std::memcpy(e.laddr, l, 4);
  std::memcpy(e.raddr, r, 4);
  return e;
}

Event tw_ev(uint8_t type, uint64_t ts, uint64_t conn) {
  Event e{};
  e.type = type;
  e.ts_ns = ts;
  e.conn = conn;
  e.old_state = kTcpTimeWait;
  e.new_state = kTcpTimeWait;
  e.sk_flags = TCPSCOPE_SK_TIMEWAIT;
  return on_tuple(e, static_cast<uint16_t>(conn));
}

// A connection that closes first and leaves a tw sock (timer armed, then
// FIN_WAIT2 -> CLOSE); returns what the last record triggered.
std::optional<std::string> enter_time_wait(TriggerMonitor& m, uint64_t ts, uint64_t conn) {
  const auto port = static_cast<uint16_t>(conn);
  m.observe(on_tuple(state_ev(ts, conn, kTcpEstablished, kTcpFinWait1), port));
  m.observe(on_tuple(state_ev(ts + 1, conn, kTcpFinWait1, kTcpFinWait2), port));
  m.observe(tw_ev(TCPSCOPE_EV_TW_START, ts + 2, conn));
  return m.observe(
      on_tuple(state_ev(ts + 3, conn, kTcpFinWait2, kTcpClose, TCPSCOPE_SK_RCV_SHUTDOWN), port));
}

TEST(Triggers, LateFinReset) {
  TriggerMonitor m(TriggerConfig{.late_fin_rst = true});
  m.observe(config_ev(TCPSCOPE_CONFIG_TW_TIMERS));
  // The client closes first and gets no tw sock (no timer armed: buckets
  // full); the server's FIN then meets no socket.
  m.observe(on_tuple(state_ev(kSec, 7, kTcpEstablished, kTcpFinWait1), 7));
  m.observe(on_tuple(state_ev(kSec + 1, 7, kTcpFinWait1, kTcpFinWait2), 7));
  m.observe(on_tuple(state_ev(kSec + 2, 7, kTcpFinWait2, kTcpClose), 7));
  Event rst{};
  rst.type = TCPSCOPE_EV_RESET_SENT;
  rst.ts_ns = 2 * kSec;
  rst.reason = 1;  // NO_SOCKET
  rst.sk_flags = TCPSCOPE_SK_NO_SOCKET;
  rst.tcp_flags = TCPSCOPE_TCP_ACK;  // a stray ACK: not a late FIN
  EXPECT_FALSE(m.observe(on_tuple(rst, 7)));
  EXPECT_EQ(m.late_fin_resets(), 0u);
  rst.tcp_flags = TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK;
  auto fired = m.observe(on_tuple(rst, 7));
  ASSERT_TRUE(fired);
  EXPECT_EQ(*fired, "late-FIN RST");
  EXPECT_EQ(m.late_fin_resets(), 1u);
  // A FIN for a tuple that never closed here is no late FIN.
  EXPECT_FALSE(m.observe(on_tuple(rst, 8)));

  TriggerMonitor off(TriggerConfig{});
  off.observe(on_tuple(state_ev(kSec, 7, kTcpFinWait2, kTcpClose), 7));
  EXPECT_FALSE(off.observe(on_tuple(rst, 7)));
}

TEST(Triggers, TimeWaitCountOverN) {
  TriggerMonitor m(TriggerConfig{.time_wait_over = 3});
  m.observe(config_ev(TCPSCOPE_CONFIG_TW_TIMERS));
  // Without an armed tw timer a close is no TIME_WAIT (skipped).
  EXPECT_FALSE(m.observe(on_tuple(state_ev(2 * kSec, 1, kTcpFinWait2, kTcpClose), 1)));
  EXPECT_FALSE(m.observe(on_tuple(state_ev(2 * kSec, 2, kTcpLastAck, kTcpClose), 2)));
  for (uint64_t c = 3; c < 6; ++c) EXPECT_FALSE(enter_time_wait(m, 3 * kSec, c));
  EXPECT_EQ(m.time_wait_open(), 3u);
  auto fired = enter_time_wait(m, 4 * kSec, 6);
  ASSERT_TRUE(fired);
  EXPECT_EQ(*fired, "TIME_WAIT count 4 over 3");
  EXPECT_FALSE(enter_time_wait(m, 5 * kSec, 7));  // on the edge only: 5 open
  // Two expire: 3 open, re-armed; the next one fires again.
  EXPECT_FALSE(m.observe(tw_ev(TCPSCOPE_EV_TW_EXPIRE, 63 * kSec, 3)));
  EXPECT_FALSE(m.observe(tw_ev(TCPSCOPE_EV_TW_EXPIRE, 63 * kSec, 4)));
  EXPECT_EQ(m.time_wait_open(), 3u);
  EXPECT_TRUE(enter_time_wait(m, 64 * kSec, 8));
}

TEST(Triggers, StuckCloseWaits) {
  TriggerMonitor m(TriggerConfig{.close_wait_stuck = 2});
  m.observe(config_ev(0, 30'000));  // --close-wait-threshold 30
  auto tick = [&m](uint64_t ts) {
    Event t{};
    t.type = TCPSCOPE_EV_TICK;
    t.ts_ns = ts;
    return m.observe(t);
  };
  for (uint64_t c = 1; c <= 3; ++c)
    m.observe(on_tuple(state_ev(c * kSec, c, kTcpEstablished, kTcpCloseWait), uint16_t(c)));
  m.observe(on_tuple(state_ev(4 * kSec, 3, kTcpCloseWait, kTcpLastAck), 3));  // closed in time
  EXPECT_FALSE(tick(20 * kSec));
  EXPECT_FALSE(tick(31 * kSec + 1));
  EXPECT_EQ(m.close_wait_stuck(), 1u);
  auto fired = tick(32 * kSec + 1);
  ASSERT_TRUE(fired);
  EXPECT_EQ(*fired, "2 CLOSE_WAIT stuck over 30 s");
  EXPECT_FALSE(tick(33 * kSec));  // edge only
  m.observe(on_tuple(state_ev(40 * kSec, 1, kTcpCloseWait, kTcpLastAck), 1));
  EXPECT_EQ(m.close_wait_stuck(), 1u);  // re-armed
  m.observe(on_tuple(state_ev(42 * kSec, 4, kTcpEstablished, kTcpCloseWait), 4));
  EXPECT_FALSE(tick(71 * kSec));
  EXPECT_TRUE(tick(72 * kSec + 1));
}

}  // namespace
}  // namespace tcpscope
