#include <gtest/gtest.h>
#include "tcpscope/tracker.hpp"
TEST(Tracker, Placeholder) { SUCCEED(); }
