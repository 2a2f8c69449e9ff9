// The capture file format (docs/capture-format.md): a versioned header, then
// blocks of raw events, each with a length and a CRC-32, zstd-compressed by
// default. The writer flushes often enough that a kill -9 loses at most the
// last flush interval; the reader treats files as untrusted and stops cleanly
// at a truncated or corrupt tail. Pure: no BPF, no root.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/result.hpp"

namespace tcpscope::capture {

inline constexpr char kMagic[8] = {'T', 'C', 'P', 'S', 'C', 'O', 'P', 'E'};
inline constexpr uint16_t kFormatVersion = 1;
inline constexpr uint32_t kBlockMagic = 0x4b425354;  // "TSBK" little-endian
inline constexpr size_t kFileHeaderFixed = 16;       // magic, version, flags, meta_len
inline constexpr size_t kBlockHeaderSize = 24;
// Reader limits: anything larger is corrupt, so a lying length never makes
// the reader allocate more than this.
inline constexpr uint32_t kMaxMetaLen = 64 * 1024;
inline constexpr uint32_t kMaxBlockRaw = 8u << 20;
inline constexpr uint32_t kMaxString = 4096;
inline constexpr uint32_t kMaxOptions = 256;
// Record sizes a reader accepts. struct tcpscope_event only ever grows at its
// end: shorter records (older captures) are zero-extended, longer ones (newer
// tcpscope) keep the fields this build knows. 120 = the first layout.
inline constexpr uint32_t kMinEventSize = 120;
inline constexpr uint32_t kMaxEventSize = 4096;

enum class BlockKind : uint8_t { Events = 1, End = 2 };
enum class Codec : uint8_t { None = 0, Zstd = 1 };
// End block flag: the capture continues in the next numbered part.
inline constexpr uint16_t kEndContinues = 1;

// Metadata tags (TLV: u16 tag, u32 length, value). Unknown tags are skipped.
enum MetaTag : uint16_t {
  kTagVersion = 1,     // tcpscope version that wrote the file (string)
  kTagHost = 2,        // host name (string)
  kTagKernel = 3,      // kernel release (string)
  kTagBootOffset = 4,  // CLOCK_REALTIME - CLOCK_BOOTTIME at start, ns (i64)
  kTagStart = 5,       // CLOCK_BOOTTIME at start, ns (u64)
  kTagCaptureId = 6,   // random id shared by all parts of one capture (u64)
  kTagPart = 7,        // part number, 0 = first file (u32)
  kTagEventSize = 8,   // bytes per record (u32)
  kTagOption = 9,      // one option used: "name=value" (string, repeated)
  kTagRing = 10,       // flight recorder size in bytes, 0 = continuous (u64)
  kTagTrigger = 11,    // why a flight recorder dump was written (string)
};

// The file header, i.e. what report needs to know about the run.
struct CaptureInfo {
  uint16_t format_version = kFormatVersion;
  std::string tcpscope_version;
  std::string host;
  std::string kernel;
  int64_t boot_offset_ns = 0;
  uint64_t start_ns = 0;
  uint64_t capture_id = 0;
  uint32_t part = 0;
  uint32_t event_size = sizeof(Event);
  std::vector<std::pair<std::string, std::string>> options;
  uint64_t ring_bytes = 0;
  std::string trigger;
};

// Serialised header (magic through CRC), and its parser. Exposed for tests.
std::vector<uint8_t> encode_header(const CaptureInfo& info);

// Path of part N of a capture: FILE, FILE.1, FILE.2, ...
std::string part_path(const std::string& base, uint32_t part);

struct WriterOptions {
  Codec codec = Codec::Zstd;
  int zstd_level = 1;      // the cheapest: compression is most of a recording's CPU
  uint64_t max_size = 0;   // bytes per file before rotating; 0 = never
  uint32_t max_files = 0;  // parts kept on disk; 0 = all
  uint64_t flush_interval_ns = 500'000'000;
  uint32_t block_events = 4096;  // records per block at most
};

// Appends records to a capture. append() never allocates: records are copied
// into a preallocated block that is compressed and written when full or when
// tick() finds it older than the flush interval. A write error (disk full)
// truncates the file back to its last complete block, so what is on disk
// stays valid, and is then reported by error().
class CaptureWriter {
 public:
  static Result<std::unique_ptr<CaptureWriter>> create(const std::string& path, CaptureInfo info,
                                                       WriterOptions opt = {});
  ~CaptureWriter();
  CaptureWriter(const CaptureWriter&) = delete;
  CaptureWriter& operator=(const CaptureWriter&) = delete;

  // False once the writer has failed (see error()).
  bool append(const Event& ev) {
    if (failed_) return false;
    std::memcpy(block_.data() + pending_ * record_size_, &ev, record_size_);
    if (++pending_ == opt_.block_events) return flush();
    return true;
  }
  // Flushes the pending block if the last flush is at least the flush
  // interval before now_ns (any monotonic clock, the same on every call).
  bool tick(uint64_t now_ns);
  bool flush();
  // Flushes, writes the end marker and closes. Idempotent.
  std::optional<Error> close();

  bool failed() const { return failed_; }
  const std::optional<Error>& error() const { return error_; }
  uint64_t records() const { return records_total_; }
  uint32_t part() const { return part_; }
  uint64_t bytes_written() const { return bytes_total_; }
  const std::string& current_path() const { return cur_path_; }

 private:
  CaptureWriter() = default;
  std::optional<Error> open_part(uint32_t part);
  // Each returns 0 or the errno of the failed write (the partial block is
  // then already cut off the file).
  int write_block(BlockKind kind, Codec codec, uint16_t flags, const uint8_t* payload,
                  uint32_t stored_len, uint32_t raw_len, uint32_t count);
  int write_events(const uint8_t* records, uint32_t count);
  int write_end(uint16_t flags);
  bool write_all(const uint8_t* p, size_t n);
  int rotate();
  void fail(const std::string& what, int err);
  void close_fd();

  struct ZstdCtxDeleter {
    void operator()(void* p) const;
  };

  std::string base_;
  CaptureInfo info_;
  WriterOptions opt_;
  int fd_ = -1;
  std::string cur_path_;
  uint32_t part_ = 0;
  uint64_t file_size_ = 0;  // bytes of complete blocks in the current part
  uint64_t part_blocks_ = 0;
  uint64_t records_part_ = 0, records_total_ = 0, bytes_total_ = 0;
  size_t record_size_ = sizeof(Event);
  std::vector<uint8_t> block_;  // block_events records
  std::vector<uint8_t> out_;    // compressed payload
  uint32_t pending_ = 0;
  uint64_t last_flush_ns_ = 0;
  bool failed_ = false, closed_ = false;
  std::optional<Error> error_;
  std::unique_ptr<void, ZstdCtxDeleter> cctx_;
};

// Where the reader stopped, and why.
struct ReadStatus {
  enum class Kind {
    Clean,      // end marker of the last part read
    NoEnd,      // ends at a block boundary without an end marker (killed)
    Truncated,  // ends inside a block
    Corrupt,    // bad checksum, bad block header, garbage
  };
  Kind kind = Kind::Clean;
  std::string path;      // file (part) where it stopped
  uint64_t offset = 0;   // byte offset of the block it stopped at
  uint64_t skipped = 0;  // bytes from there to the end of that file
  std::string detail;    // what was wrong
  uint64_t records = 0, blocks = 0;
  uint32_t parts = 0;
  uint64_t unknown_blocks = 0;  // skipped: newer block kinds

  bool ok() const { return kind == Kind::Clean; }
  // One line for stderr (without the "tcpscope: " prefix); empty if Clean.
  std::string message() const;
};

// Byte source: a file or a memory buffer (tests, fuzzing).
class Source {
 public:
  virtual ~Source() = default;
  // Reads up to n bytes; fewer only at the end. -errno on error.
  virtual long read(void* buf, size_t n) = 0;
  virtual uint64_t size() const = 0;  // total bytes (as of open)
};

// Reads a capture, following rotated parts. Every length is checked against
// the limits above and against the bytes actually left before anything is
// allocated.
class CaptureReader {
 public:
  // Opens the file and reads its header; an unreadable header is an Error.
  static Result<std::unique_ptr<CaptureReader>> open(const std::string& path,
                                                     bool follow_parts = true);
  static Result<std::unique_ptr<CaptureReader>> from_memory(const uint8_t* data, size_t size);
  ~CaptureReader();
  CaptureReader(const CaptureReader&) = delete;
  CaptureReader& operator=(const CaptureReader&) = delete;

  const CaptureInfo& info() const { return info_; }  // of the first part read
  // The next record, or false at the end; status() says how it ended.
  bool next(Event& ev);
  const ReadStatus& status() const { return status_; }

 private:
  CaptureReader() = default;
  static Result<CaptureInfo> read_header(Source& src, const std::string& name,
                                         uint64_t& header_len);
  bool read_block();
  bool next_part();
  void stop(ReadStatus::Kind kind, std::string detail);

  struct ZstdDctxDeleter {
    void operator()(void* p) const;
  };

  std::unique_ptr<Source> src_;
  std::string base_, path_;
  bool follow_ = true;
  CaptureInfo info_;
  uint32_t cur_part_ = 0;
  uint64_t offset_ = 0;  // of the next block in the current file
  std::vector<uint8_t> stored_, raw_;
  uint32_t count_ = 0, index_ = 0;
  bool done_ = false;
  ReadStatus status_;
  std::unique_ptr<void, ZstdDctxDeleter> dctx_;
};

// The value of option NAME in the header, empty if absent.
inline std::string option(const CaptureInfo& info, const std::string& name) {
  for (const auto& [k, v] : info.options)
    if (k == name) return v;
  return {};
}

}  // namespace tcpscope::capture
