// `tcpscope record` (capture to file, flight recorder) and `tcpscope report`
// (the same reports from a capture).
#pragma once

#include "cli.hpp"
#include "tcpscope/pipeline.hpp"

namespace tcpscope {

// The analyzers every path uses (trace, record --json, report): one place, so
// a capture's report can never be configured differently from live.
void setup_pipeline(Pipeline& pipeline, const Options& o);

int run_record(const Options& o);
int run_report(const Options& o);

}  // namespace tcpscope
