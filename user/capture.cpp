#include "tcpscope/capture.hpp"
#include "tcpscope/unique_fd.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <random>

namespace tcpscope::capture {

// The format is little-endian; records are stored as the host lays them out.
static_assert(std::endian::native == std::endian::little,
              "capture format needs a little-endian host");

namespace {

// End block payload: records in this part, records in the whole capture.
constexpr uint32_t kEndPayload = 16;
// Compressed data may exceed the raw size a little (zstd's bound).
const size_t kMaxBlockStored = ZSTD_COMPRESSBOUND(kMaxBlockRaw);

// (resize + memcpy: GCC 12 at -O3 takes vector::insert of a few bytes for
// an out-of-bounds copy, -Warray-bounds.)
void append(std::vector<uint8_t>& o, const void* data, size_t len) {
  const size_t at = o.size();
  o.resize(at + len);
  if (len) std::memcpy(o.data() + at, data, len);
}
template <typename T>
void put(std::vector<uint8_t>& o, T v) {
  append(o, &v, sizeof(T));
}
void put16(std::vector<uint8_t>& o, uint16_t v) { put(o, v); }
void put32(std::vector<uint8_t>& o, uint32_t v) { put(o, v); }
template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

void put_tlv(std::vector<uint8_t>& o, uint16_t tag, const void* data, size_t len) {
  put16(o, tag);
  put32(o, static_cast<uint32_t>(len));
  const auto* p = static_cast<const uint8_t*>(data);
  o.insert(o.end(), p, p + len);
}
void put_str(std::vector<uint8_t>& o, uint16_t tag, const std::string& s) {
  put_tlv(o, tag, s.data(), std::min<size_t>(s.size(), kMaxString));
}
template <typename T>
void put_num(std::vector<uint8_t>& o, uint16_t tag, T v) {
  put_tlv(o, tag, &v, sizeof(v));
}

uint32_t crc(uint32_t c, const uint8_t* p, size_t n) {
  return static_cast<uint32_t>(crc32(c, p, static_cast<uInt>(n)));
}

// The fuzz build accepts any checksum, so the fuzzer reaches the parsing
// behind it (the checksum test itself is a single comparison).
bool crc_ok(uint32_t computed, uint32_t stored) {
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
  (void)computed;
  (void)stored;
  return true;
#else
  return computed == stored;
#endif
}

using Fd = UniqueFd;

class FileSource final : public Source {
 public:
  FileSource(int fd, uint64_t size) : fd_(fd), size_(size) {}
  long read(void* buf, size_t n) override {
    size_t got = 0;
    auto* p = static_cast<uint8_t*>(buf);
    while (got < n) {
      const ssize_t r = ::read(fd_.get(), p + got, n - got);
      if (r < 0) {
        if (errno == EINTR) continue;
        return -errno;
      }
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    return static_cast<long>(got);
  }
  uint64_t size() const override { return size_; }

 private:
  Fd fd_;
  uint64_t size_;
};

class MemorySource final : public Source {
 public:
  MemorySource(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  long read(void* buf, size_t n) override {
    const size_t k = std::min(n, size_ - pos_);
    if (k) std::memcpy(buf, data_ + pos_, k);
    pos_ += k;
    return static_cast<long>(k);
  }
  uint64_t size() const override { return size_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

Result<std::unique_ptr<Source>> open_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error{fmt::format("{}: {}", path, std::strerror(errno))};
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Error{fmt::format("{}: not a regular file", path)};
  }
  return std::unique_ptr<Source>(new FileSource(fd, static_cast<uint64_t>(st.st_size)));
}

}  // namespace

std::string part_path(const std::string& base, uint32_t part) {
  return part == 0 ? base : fmt::format("{}.{}", base, part);
}

std::vector<uint8_t> encode_header(const CaptureInfo& info) {
  std::vector<uint8_t> meta;
  put_str(meta, kTagVersion, info.tcpscope_version);
  put_str(meta, kTagHost, info.host);
  put_str(meta, kTagKernel, info.kernel);
  put_num<int64_t>(meta, kTagBootOffset, info.boot_offset_ns);
  put_num<uint64_t>(meta, kTagStart, info.start_ns);
  put_num<uint64_t>(meta, kTagCaptureId, info.capture_id);
  put_num<uint32_t>(meta, kTagPart, info.part);
  put_num<uint32_t>(meta, kTagEventSize, info.event_size);
  size_t nopt = 0;
  for (const auto& [k, v] : info.options) {
    if (++nopt > kMaxOptions) break;
    put_str(meta, kTagOption, k + "=" + v);
  }
  put_num<uint64_t>(meta, kTagRing, info.ring_bytes);
  if (!info.trigger.empty()) put_str(meta, kTagTrigger, info.trigger);

  std::vector<uint8_t> out;
  append(out, kMagic, sizeof(kMagic));
  put16(out, info.format_version);
  put16(out, 0);  // flags, none defined
  put32(out, static_cast<uint32_t>(meta.size()));
  append(out, meta.data(), meta.size());
  put32(out, crc(0, out.data(), out.size()));
  return out;
}

// ---- writer -----------------------------------------------------------------

void CaptureWriter::ZstdCtxDeleter::operator()(void* p) const {
  ZSTD_freeCCtx(static_cast<ZSTD_CCtx*>(p));
}

Result<std::unique_ptr<CaptureWriter>> CaptureWriter::create(const std::string& path,
                                                             CaptureInfo info, WriterOptions opt) {
  std::unique_ptr<CaptureWriter> w(new CaptureWriter());
  info.format_version = kFormatVersion;
  info.event_size = sizeof(Event);
  if (info.capture_id == 0) {
    std::random_device rd;
    info.capture_id = (static_cast<uint64_t>(rd()) << 32) | rd();
  }
  opt.block_events = std::clamp<uint32_t>(opt.block_events, 1, kMaxBlockRaw / sizeof(Event));
  w->base_ = path;
  w->info_ = std::move(info);
  w->opt_ = opt;
  w->block_.resize(size_t{opt.block_events} * sizeof(Event));
  w->out_.resize(ZSTD_compressBound(w->block_.size()));
  if (opt.codec == Codec::Zstd) {
    w->cctx_.reset(ZSTD_createCCtx());
    if (!w->cctx_) return Error{"zstd: cannot create a compression context"};
  }
  if (auto err = w->open_part(0)) return *err;
  return w;
}

CaptureWriter::~CaptureWriter() { close(); }

void CaptureWriter::close_fd() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

std::optional<Error> CaptureWriter::open_part(uint32_t part) {
  const std::string path = part_path(base_, part);
  // 0600: captures hold addresses and process names. O_NOFOLLOW: we run as
  // root, a planted symlink must not redirect the truncation.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    const int err = errno;
    return Error{fmt::format("cannot create {}: {}{}", path, std::strerror(err),
                             err == ELOOP ? " (it is a symbolic link)" : "")};
  }
  if (fchmod(fd, 0600) != 0) {  // an existing file keeps its mode through O_TRUNC
    const int err = errno;
    ::close(fd);
    return Error{fmt::format("cannot chmod {}: {}", path, std::strerror(err))};
  }
  fd_ = fd;
  cur_path_ = path;
  part_ = part;
  file_size_ = 0;
  part_blocks_ = 0;
  records_part_ = 0;
  info_.part = part;
  const std::vector<uint8_t> header = encode_header(info_);
  if (!write_all(header.data(), header.size())) {
    const int err = errno;
    ::ftruncate(fd_, 0);
    close_fd();
    return Error{fmt::format("writing {}: {}", path, std::strerror(err))};
  }
  file_size_ = header.size();
  bytes_total_ += header.size();
  if (opt_.max_files && part >= opt_.max_files)
    ::unlink(part_path(base_, part - opt_.max_files).c_str());
  return std::nullopt;
}

bool CaptureWriter::write_all(const uint8_t* p, size_t n) {
  while (n > 0) {
    const ssize_t r = ::write(fd_, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (r == 0) {
      errno = ENOSPC;
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void CaptureWriter::fail(const std::string& what, int err) {
  failed_ = true;
  if (!error_)
    error_ = Error{fmt::format("{}: {}; the capture is valid up to record {}", what,
                               std::strerror(err), records_total_)};
}

int CaptureWriter::write_block(BlockKind kind, Codec codec, uint16_t flags, const uint8_t* payload,
                               uint32_t stored_len, uint32_t raw_len, uint32_t count) {
  if (fd_ < 0) return EBADF;
  uint8_t h[kBlockHeaderSize];
  const uint32_t magic = kBlockMagic;
  std::memcpy(h, &magic, 4);
  h[4] = static_cast<uint8_t>(kind);
  h[5] = static_cast<uint8_t>(codec);
  std::memcpy(h + 6, &flags, 2);
  std::memcpy(h + 8, &stored_len, 4);
  std::memcpy(h + 12, &raw_len, 4);
  std::memcpy(h + 16, &count, 4);
  uint32_t c = crc(0, h, 20);
  c = crc(c, payload, stored_len);
  std::memcpy(h + 20, &c, 4);
  if (!write_all(h, sizeof(h)) || !write_all(payload, stored_len)) {
    const int err = errno ? errno : EIO;
    // Cut the partial block off so the file stays valid up to here.
    if (::ftruncate(fd_, static_cast<off_t>(file_size_)) == 0)
      ::lseek(fd_, static_cast<off_t>(file_size_), SEEK_SET);
    return err;
  }
  const size_t n = kBlockHeaderSize + stored_len;
  file_size_ += n;
  bytes_total_ += n;
  ++part_blocks_;
  return 0;
}

int CaptureWriter::write_end(uint16_t flags) {
  uint8_t end[kEndPayload];
  std::memcpy(end, &records_part_, 8);
  std::memcpy(end + 8, &records_total_, 8);
  return write_block(BlockKind::End, Codec::None, flags, end, kEndPayload, kEndPayload, 0);
}

int CaptureWriter::rotate() {
  if (const int err = write_end(kEndContinues)) return err;
  ::fdatasync(fd_);
  close_fd();
  if (auto err = open_part(part_ + 1)) {
    failed_ = true;
    error_ = *err;
    return EIO;
  }
  return 0;
}

int CaptureWriter::write_events(const uint8_t* records, uint32_t count) {
  const uint32_t raw = count * static_cast<uint32_t>(record_size_);
  Codec codec = Codec::None;
  uint32_t stored = raw;
  const uint8_t* payload = records;
  if (opt_.codec == Codec::Zstd) {
    const size_t n = ZSTD_compressCCtx(static_cast<ZSTD_CCtx*>(cctx_.get()), out_.data(),
                                       out_.size(), records, raw, opt_.zstd_level);
    if (!ZSTD_isError(n) && n < raw) {
      codec = Codec::Zstd;
      stored = static_cast<uint32_t>(n);
      payload = out_.data();
    }
  }
  // Rotate before a block that would push this part (with its end marker)
  // past max_size; a part always holds at least one block.
  if (opt_.max_size && part_blocks_ > 0 &&
      file_size_ + 2 * kBlockHeaderSize + stored + kEndPayload > opt_.max_size) {
    if (const int err = rotate()) return err;
  }
  if (const int err = write_block(BlockKind::Events, codec, 0, payload, stored, raw, count))
    return err;
  records_part_ += count;
  records_total_ += count;
  return 0;
}

bool CaptureWriter::flush() {
  if (failed_ || closed_) return false;
  if (pending_ == 0) return true;
  const uint32_t count = pending_;
  pending_ = 0;
  int err = write_events(block_.data(), count);
  // Out of space: smaller blocks may still fit in what is left, so a full
  // disk loses as little as possible.
  constexpr uint32_t kSalvage = 32;
  if ((err == ENOSPC || err == EFBIG || err == EDQUOT) && count > kSalvage) {
    for (uint32_t done = 0; done < count;) {
      const uint32_t n = std::min(kSalvage, count - done);
      if (write_events(block_.data() + size_t{done} * record_size_, n) != 0) break;
      done += n;
    }
  }
  if (err) {
    if (!failed_) fail("writing " + cur_path_, err);
    return false;
  }
  return true;
}

bool CaptureWriter::tick(uint64_t now_ns) {
  if (pending_ == 0) {
    last_flush_ns_ = now_ns;
    return !failed_;
  }
  if (now_ns - last_flush_ns_ < opt_.flush_interval_ns) return !failed_;
  last_flush_ns_ = now_ns;
  return flush();
}

std::optional<Error> CaptureWriter::close() {
  if (closed_) return error_;
  if (!failed_) flush();
  if (fd_ >= 0) {
    // Even after a write error, try to mark the end: it may fit now that the
    // partial block is gone.
    const int err = write_end(0);
    if (err && !failed_) fail("writing " + cur_path_, err);
    if (::fdatasync(fd_) != 0 && errno != EINVAL && !failed_) fail("syncing " + cur_path_, errno);
    close_fd();
  }
  closed_ = true;
  return error_;
}

// ---- reader -----------------------------------------------------------------

void CaptureReader::ZstdDctxDeleter::operator()(void* p) const {
  ZSTD_freeDCtx(static_cast<ZSTD_DCtx*>(p));
}

CaptureReader::~CaptureReader() = default;

std::string ReadStatus::message() const {
  switch (kind) {
    case Kind::Clean:
      return {};
    case Kind::NoEnd:
      return fmt::format(
          "{}: capture has no end marker (recorder killed or out of disk?): "
          "read {} records; events of the last second before the stop may be "
          "missing",
          path, records);
    case Kind::Truncated:
      return fmt::format(
          "{}: capture truncated at byte {} ({}): skipped the last {} bytes, "
          "read {} records",
          path, offset, detail, skipped, records);
    case Kind::Corrupt:
      return fmt::format(
          "{}: corrupt capture at byte {} ({}): skipped the last {} bytes, "
          "read {} records",
          path, offset, detail, skipped, records);
  }
  return {};
}

namespace {

// Parses the TLV metadata. Every length is checked against what is left.
std::optional<std::string> parse_meta(const uint8_t* p, size_t n, CaptureInfo& info) {
  bool have_offset = false, have_start = false, have_size = false;
  size_t pos = 0;
  while (pos < n) {
    if (n - pos < 6) return "metadata entry cut short";
    const uint16_t tag = get<uint16_t>(p + pos);
    const uint32_t len = get<uint32_t>(p + pos + 2);
    pos += 6;
    if (len > n - pos) return fmt::format("metadata entry {} claims {} bytes", tag, len);
    const uint8_t* v = p + pos;
    pos += len;
    auto str = [&](std::string& out) -> std::optional<std::string> {
      if (len > kMaxString) return fmt::format("metadata string {} too long", tag);
      out.assign(reinterpret_cast<const char*>(v), len);
      return std::nullopt;
    };
    auto num = [&](auto& out) -> std::optional<std::string> {
      if (len != sizeof(out)) return fmt::format("metadata entry {} has length {}", tag, len);
      std::memcpy(&out, v, sizeof(out));
      return std::nullopt;
    };
    std::optional<std::string> err;
    switch (tag) {
      case kTagVersion:
        err = str(info.tcpscope_version);
        break;
      case kTagHost:
        err = str(info.host);
        break;
      case kTagKernel:
        err = str(info.kernel);
        break;
      case kTagBootOffset:
        err = num(info.boot_offset_ns);
        have_offset = true;
        break;
      case kTagStart:
        err = num(info.start_ns);
        have_start = true;
        break;
      case kTagCaptureId:
        err = num(info.capture_id);
        break;
      case kTagPart:
        err = num(info.part);
        break;
      case kTagEventSize:
        err = num(info.event_size);
        have_size = true;
        break;
      case kTagRing:
        err = num(info.ring_bytes);
        break;
      case kTagTrigger:
        err = str(info.trigger);
        break;
      case kTagOption: {
        std::string s;
        err = str(s);
        if (err) break;
        if (info.options.size() >= kMaxOptions) return std::string("too many options");
        const auto eq = s.find('=');
        if (eq == std::string::npos) return std::string("option without '='");
        info.options.emplace_back(s.substr(0, eq), s.substr(eq + 1));
        break;
      }
      default:
        break;  // newer metadata: skip
    }
    if (err) return err;
  }
  if (!have_offset || !have_start || !have_size) return "required metadata missing";
  return std::nullopt;
}

}  // namespace

Result<CaptureInfo> CaptureReader::read_header(Source& src, const std::string& name,
                                               uint64_t& header_len) {
  uint8_t fixed[kFileHeaderFixed];
  const long n = src.read(fixed, sizeof(fixed));
  if (n < 0) return Error{fmt::format("{}: {}", name, std::strerror(static_cast<int>(-n)))};
  if (n == 0) return Error{fmt::format("{}: empty file, not a tcpscope capture", name)};
  if (n < 8 || std::memcmp(fixed, kMagic, sizeof(kMagic)) != 0)
    return Error{fmt::format("{}: not a tcpscope capture (bad magic)", name)};
  if (n < static_cast<long>(sizeof(fixed)))
    return Error{fmt::format("{}: capture header truncated ({} bytes)", name, n)};
  const uint16_t version = get<uint16_t>(fixed + 8);
  if (version != kFormatVersion)
    return Error{fmt::format(
        "{}: capture format version {} is not supported (this tcpscope "
        "reads version {}){}",
        name, version, kFormatVersion, version > kFormatVersion ? ": upgrade tcpscope" : "")};
  const uint32_t meta_len = get<uint32_t>(fixed + 12);
  if (meta_len > kMaxMetaLen)
    return Error{fmt::format("{}: corrupt capture header (metadata length {})", name, meta_len)};
  if (kFileHeaderFixed + meta_len + 4 > src.size())
    return Error{fmt::format("{}: capture header truncated", name)};
  std::vector<uint8_t> buf(kFileHeaderFixed + meta_len + 4);
  std::memcpy(buf.data(), fixed, kFileHeaderFixed);
  const long m = src.read(buf.data() + kFileHeaderFixed, meta_len + 4);
  if (m != static_cast<long>(meta_len + 4))
    return Error{fmt::format("{}: capture header truncated", name)};
  if (!crc_ok(crc(0, buf.data(), kFileHeaderFixed + meta_len),
              get<uint32_t>(buf.data() + kFileHeaderFixed + meta_len)))
    return Error{fmt::format("{}: corrupt capture header (checksum mismatch)", name)};
  CaptureInfo info;
  info.format_version = version;
  header_len = buf.size();
  if (auto err = parse_meta(buf.data() + kFileHeaderFixed, meta_len, info))
    return Error{fmt::format("{}: corrupt capture header ({})", name, *err)};
  if (info.event_size < kMinEventSize || info.event_size > kMaxEventSize)
    return Error{fmt::format("{}: corrupt capture header (record size {})", name, info.event_size)};
  return info;
}

Result<std::unique_ptr<CaptureReader>> CaptureReader::open(const std::string& path,
                                                           bool follow_parts) {
  auto src = open_file(path);
  if (!src) return src.error();
  uint64_t header_len = 0;
  auto info = read_header(**src, path, header_len);
  if (!info) return info.error();
  std::unique_ptr<CaptureReader> r(new CaptureReader());
  r->src_ = std::move(*src);
  r->path_ = path;
  r->follow_ = follow_parts;
  r->info_ = std::move(*info);
  r->cur_part_ = r->info_.part;
  // FILE.3 is part 3 of the capture FILE: later parts are FILE.4, FILE.5...
  const std::string suffix = fmt::format(".{}", r->info_.part);
  r->base_ = path;
  if (r->info_.part > 0 && path.size() > suffix.size() && path.ends_with(suffix))
    r->base_ = path.substr(0, path.size() - suffix.size());
  r->offset_ = header_len;
  r->status_.parts = 1;
  r->status_.path = path;
  return r;
}

Result<std::unique_ptr<CaptureReader>> CaptureReader::from_memory(const uint8_t* data,
                                                                  size_t size) {
  auto src = std::unique_ptr<Source>(new MemorySource(data, size));
  uint64_t header_len = 0;
  auto info = read_header(*src, "<memory>", header_len);
  if (!info) return info.error();
  std::unique_ptr<CaptureReader> r(new CaptureReader());
  r->src_ = std::move(src);
  r->path_ = r->base_ = "<memory>";
  r->follow_ = false;
  r->info_ = std::move(*info);
  r->cur_part_ = r->info_.part;
  r->offset_ = header_len;
  r->status_.parts = 1;
  r->status_.path = r->path_;
  return r;
}

void CaptureReader::stop(ReadStatus::Kind kind, std::string detail) {
  done_ = true;
  status_.kind = kind;
  status_.path = path_;
  status_.offset = offset_;
  status_.skipped = src_->size() - std::min(offset_, src_->size());
  status_.detail = std::move(detail);
}

bool CaptureReader::next_part() {
  const std::string path = part_path(base_, cur_part_ + 1);
  auto src = open_file(path);
  if (!src) {
    stop(ReadStatus::Kind::Truncated, fmt::format("the next part: {}", src.error().message));
    return false;
  }
  uint64_t header_len = 0;
  auto info = read_header(**src, path, header_len);
  if (!info) {
    stop(ReadStatus::Kind::Corrupt, fmt::format("the next part: {}", info.error().message));
    return false;
  }
  if (info->capture_id != info_.capture_id || info->part != cur_part_ + 1) {
    stop(ReadStatus::Kind::Corrupt,
         fmt::format("{} is not part {} of this capture", path, cur_part_ + 1));
    return false;
  }
  src_ = std::move(*src);
  path_ = path;
  ++cur_part_;
  offset_ = header_len;
  ++status_.parts;
  status_.path = path_;
  return true;
}

bool CaptureReader::read_block() {
  while (!done_) {
    const uint64_t size = src_->size();
    const uint64_t left = size > offset_ ? size - offset_ : 0;
    if (left == 0) {
      stop(ReadStatus::Kind::NoEnd, "no end marker");
      return false;
    }
    if (left < kBlockHeaderSize) {
      stop(ReadStatus::Kind::Truncated, "incomplete block header");
      return false;
    }
    uint8_t h[kBlockHeaderSize];
    const long n = src_->read(h, sizeof(h));
    if (n != static_cast<long>(sizeof(h))) {
      stop(ReadStatus::Kind::Truncated,
           n < 0 ? std::string(std::strerror(static_cast<int>(-n))) : "incomplete block header");
      return false;
    }
    if (get<uint32_t>(h) != kBlockMagic) {
      stop(ReadStatus::Kind::Corrupt, "bad block magic");
      return false;
    }
    const auto kind = static_cast<BlockKind>(h[4]);
    const auto codec = static_cast<Codec>(h[5]);
    const uint16_t flags = get<uint16_t>(h + 6);
    const uint32_t stored = get<uint32_t>(h + 8);
    const uint32_t raw = get<uint32_t>(h + 12);
    const uint32_t count = get<uint32_t>(h + 16);
    if (stored > kMaxBlockStored) {
      stop(ReadStatus::Kind::Corrupt, fmt::format("block length {} over the limit", stored));
      return false;
    }
    if (stored > left - kBlockHeaderSize) {
      stop(ReadStatus::Kind::Truncated,
           fmt::format("block of {} bytes, only {} left", stored, left - kBlockHeaderSize));
      return false;
    }
    if (stored_.size() < stored) stored_.resize(stored);
    const long m = src_->read(stored_.data(), stored);
    if (m != static_cast<long>(stored)) {
      stop(ReadStatus::Kind::Truncated, "block cut short");
      return false;
    }
    uint32_t c = crc(0, h, 20);
    c = crc(c, stored_.data(), stored);
    if (!crc_ok(c, get<uint32_t>(h + 20))) {
      stop(ReadStatus::Kind::Corrupt, "checksum mismatch");
      return false;
    }
    const uint64_t block_at = offset_;
    if (kind == BlockKind::Events) {
      if (raw == 0 || raw > kMaxBlockRaw || count == 0 ||
          uint64_t{count} * info_.event_size != raw) {
        stop(ReadStatus::Kind::Corrupt,
             fmt::format("block of {} records claims {} bytes", count, raw));
        return false;
      }
      if (codec == Codec::None) {
        if (stored != raw) {
          stop(ReadStatus::Kind::Corrupt, "uncompressed block with two lengths");
          return false;
        }
        if (raw_.size() < raw) raw_.resize(raw);
        std::memcpy(raw_.data(), stored_.data(), raw);
      } else if (codec == Codec::Zstd) {
        if (!dctx_) {
          dctx_.reset(ZSTD_createDCtx());
          if (!dctx_) {
            stop(ReadStatus::Kind::Corrupt, "zstd: cannot create a context");
            return false;
          }
        }
        if (raw_.size() < raw) raw_.resize(raw);
        // dst capacity is exactly raw: zstd cannot write past it.
        const size_t r = ZSTD_decompressDCtx(static_cast<ZSTD_DCtx*>(dctx_.get()), raw_.data(), raw,
                                             stored_.data(), stored);
        if (ZSTD_isError(r) || r != raw) {
          stop(ReadStatus::Kind::Corrupt,
               ZSTD_isError(r) ? fmt::format("zstd: {}", ZSTD_getErrorName(r))
                               : fmt::format("block decompresses to {} bytes, not {}", r, raw));
          return false;
        }
      } else {
        stop(ReadStatus::Kind::Corrupt, fmt::format("unknown codec {}", h[5]));
        return false;
      }
      offset_ = block_at + kBlockHeaderSize + stored;
      ++status_.blocks;
      count_ = count;
      index_ = 0;
      return true;
    }
    offset_ = block_at + kBlockHeaderSize + stored;
    if (kind == BlockKind::End) {
      ++status_.blocks;
      if ((flags & kEndContinues) && follow_) {
        if (!next_part()) return false;
        continue;
      }
      if (offset_ < size) {
        stop(ReadStatus::Kind::Corrupt, "data after the end marker");
        return false;
      }
      done_ = true;
      status_.kind = ReadStatus::Kind::Clean;
      status_.path = path_;
      status_.offset = offset_;
      return false;
    }
    ++status_.unknown_blocks;  // a newer block kind with a valid checksum: skip it
  }
  return false;
}

bool CaptureReader::next(Event& ev) {
  while (index_ >= count_) {
    if (done_ || !read_block()) return false;
  }
  const uint8_t* rec = raw_.data() + size_t{index_} * info_.event_size;
  if (info_.event_size >= sizeof(Event)) {
    std::memcpy(&ev, rec, sizeof(Event));
  } else {  // an older, shorter layout: the fields it lacks read as zero
    std::memset(&ev, 0, sizeof(Event));
    std::memcpy(&ev, rec, info_.event_size);
  }
  ++index_;
  ++status_.records;
  return true;
}

}  // namespace tcpscope::capture
