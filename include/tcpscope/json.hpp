// A minimal streaming JSON writer into a fmt buffer: no allocation once the
// buffer has grown, commas handled, strings escaped (comm is arbitrary bytes).
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include <fmt/format.h>

namespace tcpscope {

class JsonWriter {
 public:
  explicit JsonWriter(fmt::memory_buffer& out) : out_(out) {}

  void begin_object() { open('{'); }
  void end_object() { close('}'); }
  void begin_array() { open('['); }
  void end_array() { close(']'); }
  // Member name inside an object; the value call follows.
  void key(std::string_view k);

  void value(std::string_view s);
  void value(const char* s) { value(std::string_view(s)); }
  void value(bool b);
  template <std::integral T>
  requires(!std::same_as<T, bool>) void value(T v) {
    if constexpr (std::is_signed_v<T>)
      value_signed(static_cast<int64_t>(v));
    else
      value_unsigned(static_cast<uint64_t>(v));
  }
  void value(double v);  // fixed, 3 decimals
  void null();

  template <typename T>
  void member(std::string_view k, T v) {
    key(k);
    value(v);
  }

 private:
  void value_signed(int64_t v);
  void value_unsigned(uint64_t v);
  void open(char c);
  void close(char c);
  void before_value();

  fmt::memory_buffer& out_;
  // Nesting: bit set = something was written at that level (comma needed).
  uint64_t need_comma_ = 0;
  int depth_ = 0;
  bool after_key_ = false;
};

// Appends s to out as a JSON string (quotes included). Bytes that are not
// valid UTF-8 become \u00XX so the output always parses.
void json_escape(fmt::memory_buffer& out, std::string_view s);

}  // namespace tcpscope
