// Command-line parsing for the tcpscope binary.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tcpscope/result.hpp"
#include "tcpscope/tracer.hpp"

namespace tcpscope {

struct Options {
  enum class Command { Trace, Info, Help, Version };
  Command command = Command::Trace;
  std::string help_text;

  TraceConfig trace;
  std::vector<std::string> disabled_features;
  bool json = false;
  double duration_s = 0;  // 0 = until Ctrl-C / SIGTERM
  bool verbose = false;
  int top = 10;
};

// Parses argv. Errors are usage errors (exit code 2) with one-line messages.
Result<Options> parse_command_line(int argc, char** argv);

}  // namespace tcpscope
