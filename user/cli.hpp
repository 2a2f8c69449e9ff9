// Command-line parsing for the tcpscope binary.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tcpscope/result.hpp"
#include "tcpscope/tracer.hpp"

namespace tcpscope {

// `record`: where and how to write the capture (see docs/capture-format.md).
struct RecordOptions {
  std::string output;               // -o FILE
  uint64_t max_size = 0;            // rotate to FILE.1, FILE.2... past this; 0 = never
  uint32_t max_files = 0;           // parts (or flight recorder dumps) kept; 0 = all
  bool compress = true;             // zstd
  int zstd_level = 1;               // the cheapest: compression is most of a recording's CPU
  uint64_t ring_bytes = 0;          // flight recorder: keep the last SIZE in memory
  bool trigger_late_fin = false;    // dump on a late FIN answered with a RST
  uint32_t trigger_close_wait = 0;  // dump at N stuck CLOSE_WAITs
  uint32_t trigger_time_wait = 0;   // dump when TIME_WAIT count exceeds N
  double trigger_delay_s = 1;       // keep recording this long after a trigger
  double trigger_cooldown_s = 60;   // ignore triggers this long after a dump
};

struct Options {
  enum class Command { Trace, Info, Help, Version, Record, Report };
  Command command = Command::Trace;
  std::string help_text;

  TraceConfig trace;
  std::vector<std::string> disabled_features;
  bool json = false;
  double duration_s = 0;  // 0 = until Ctrl-C / SIGTERM
  bool verbose = false;
  int top = 10;
  RecordOptions record;
  std::string report_file;  // `report FILE`
};

// Parses argv. Errors are usage errors (exit code 2) with one-line messages.
Result<Options> parse_command_line(int argc, char** argv);

}  // namespace tcpscope
