// Declaration-only stand-in for gloo's headers: the torch wheel ships none, and
// torch/csrc/distributed/c10d/ProcessGroupGloo.hpp includes a few. It uses gloo types only
// through smart-pointer members and inline methods of classes whose vtables live in
// libtorch, so declarations suffice (the object compiled against this stub is byte-identical
// to one compiled against real gloo headers; see docs/distill-engine.md).
// Never instantiate a gloo type from code compiled against this stub, and never link -lgloo:
// libtorch carries its own copy.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);  // declared only
};
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
