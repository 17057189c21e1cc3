// The native gRPC transport: a grpc++ server that carries calls and bytes, and nothing else.
//
// Every call, whatever its method, is taken by one generic callback service as a
// bidirectional stream of serialized messages. C++ receives (the call's method, metadata,
// deadline and peer, then its messages one at a time), sends (messages in order, then the
// status and trailing metadata) and notices cancellation; Python decides everything else
// (serving/frontends/native/server.py looks the method up among the servicers' handlers
// and runs them).
//
// Threads: gRPC's own threads run the reactors below and never touch Python: they queue
// events and wake the event loop through an eventfd. Python takes the queued events, all of
// them at once (one wake-up per group of calls that arrived while Python was busy), with
// Transport::take, on its own thread with the GIL held, and answers with read/write/finish,
// which only record what is asked and queue the gRPC operation to start for the sender
// thread: starting one may run gRPC's work inline (encoding, sendmsg), which would
// otherwise take the Python thread's time. So no Python code ever runs on a gRPC thread or
// the sender, and nothing here runs Python after the interpreter finalises.
//
// Flow control: a call's first message is read with the call; each next one only when
// Python asks (Transport::read), so a stream's client is held back by HTTP/2 flow control,
// not buffered here. Writes queue here; once WRITE_WINDOW are queued, write() tells Python
// to wait for a kWritable event, so a client that does not read holds the writer back.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

namespace py = pybind11;

namespace {

// What happened to a call, in the order Python takes them.
enum EventKind : int {
  kStart = 0,      // a new call: method, metadata, deadline, peer; first message if any
  kMessage = 1,    // the call's next message
  kHalfClose = 2,  // the client sends no more messages
  kCancelled = 3,  // the client cancelled, its deadline passed, or the server shut down
  kWritable = 4,   // the writes a write() said to wait for went out
};

// Messages a call may have queued for sending before write() asks Python to wait.
constexpr std::size_t kWriteWindow = 2;

// gRPC operations Python asked for, started by the sender thread.
enum OperationKind : int {
  kStartRead = 0,    // read the next message
  kStartWrite = 1,   // send the message at the front of the call's writes
  kStartFinish = 2,  // send the status (after the last message, when there is one)
};

struct Event {
  std::uint64_t call = 0;
  EventKind kind = kStart;
  grpc::ByteBuffer message;  // kStart (may be empty: has_message false), kMessage
  bool has_message = false;
  // kStart only
  std::string method;
  std::vector<std::pair<std::string, std::string>> metadata;
  // the call's deadline on the monotonic clock (CLOCK_MONOTONIC, Python's time.monotonic),
  // in seconds; < 0: none. Absolute, so the time the event waits in the queue does not
  // move it later.
  double deadline = -1.0;
  std::string peer;
};

py::bytes ToBytes(grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) {
    throw std::runtime_error("cannot read a received gRPC message");
  }
  std::size_t size = 0;
  for (const auto& slice : slices) size += slice.size();
  PyObject* bytes = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
  if (bytes == nullptr) throw py::error_already_set();
  char* out = PyBytes_AS_STRING(bytes);
  for (const auto& slice : slices) {
    if (slice.size() != 0) std::memcpy(out, slice.begin(), slice.size());
    out += slice.size();
  }
  return py::reinterpret_steal<py::bytes>(bytes);
}

grpc::ByteBuffer FromBytes(const py::bytes& data) {
  char* pointer = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(data.ptr(), &pointer, &size) != 0) {
    throw py::error_already_set();
  }
  grpc::Slice slice(pointer, static_cast<std::size_t>(size));
  return grpc::ByteBuffer(&slice, 1);
}

class Transport;

// One call. Lives until gRPC calls OnDone and no Python operation is using it (Transport
// counts those in `users`).
class Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(Transport* transport, std::uint64_t id, grpc::GenericCallbackServerContext* context)
      : transport_(transport), id_(id), context_(context) {
    StartRead(&read_);
  }

  // Python's side (no lock held by the caller): record what is asked; true when the
  // sender thread must start a gRPC operation for it (`Start`). Write's `wait`: Python
  // should wait for kWritable before its next write.
  bool Write(grpc::ByteBuffer message, bool& wait);
  bool Finish(grpc::Status status, std::vector<std::pair<std::string, std::string>> trailing,
              std::optional<grpc::ByteBuffer> last);

  // The sender thread's side: start the gRPC operation `kind`.
  void Start(OperationKind kind);

  // bookkeeping for Transport, under its mutex
  int users = 0;
  bool done = false;

 private:
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;
  void FinishNow();  // with mutex_ not held
  void ReadNext();

  Transport* transport_;
  const std::uint64_t id_;
  grpc::GenericCallbackServerContext* context_;
  grpc::ByteBuffer read_;
  bool started_ = false;  // the kStart event was queued

  std::mutex mutex_;
  std::deque<grpc::ByteBuffer> writes_;  // front: the write in flight
  bool writing_ = false;
  bool finish_requested_ = false;
  bool finish_started_ = false;
  bool cancelled_ = false;
  bool writable_wanted_ = false;  // Python waits for kWritable
  bool write_and_finish_ = false;  // the finish sends the last message too
  grpc::Status status_;
  std::vector<std::pair<std::string, std::string>> trailing_;
};

class Transport final : public grpc::CallbackGenericService {
 public:
  Transport() : wake_fd_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (wake_fd_ < 0) {
      throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
    }
  }

  ~Transport() override {
    Stop(0.0);
    close(wake_fd_);
  }

  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // Listen on `address` (host:port) with the channel arguments `options` (gRPC's names,
  // integer or string values) and, when `certificate` is set, TLS; returns the port bound
  // (0: the address could not be bound).
  int Start(const std::string& address,
            const std::vector<std::pair<std::string, std::variant<long long, std::string>>>&
                options,
            const std::string& private_key, const std::string& certificate,
            const std::string& root_certificates, bool require_client_certificate) {
    if (server_) throw std::runtime_error("the native transport is already started");
    grpc::ServerBuilder builder;
    std::shared_ptr<grpc::ServerCredentials> credentials;
    if (certificate.empty()) {
      credentials = grpc::InsecureServerCredentials();
    } else {
      grpc::SslServerCredentialsOptions tls(
          root_certificates.empty()
              ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
              : (require_client_certificate
                     ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                     : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY));
      tls.pem_root_certs = root_certificates;
      tls.pem_key_cert_pairs.push_back({private_key, certificate});
      credentials = grpc::SslServerCredentials(tls);
    }
    int port = 0;
    builder.AddListeningPort(address, credentials, &port);
    for (const auto& [name, value] : options) {
      if (std::holds_alternative<long long>(value)) {
        builder.AddChannelArgument(name, static_cast<int>(std::get<long long>(value)));
      } else {
        builder.AddChannelArgument(name, std::get<std::string>(value));
      }
    }
    builder.RegisterCallbackGenericService(this);
    {
      py::gil_scoped_release release;
      server_ = builder.BuildAndStart();
    }
    if (!server_ || port == 0) {
      server_.reset();
      return 0;
    }
    sender_ = std::thread([this] { Send(); });
    return port;
  }

  // Stop taking calls; wait up to `grace` seconds for the calls in progress (Python must
  // go on answering meanwhile: call from another thread than the event loop's), then
  // cancel the rest. Idempotent.
  void Stop(double grace) {
    std::unique_ptr<grpc::Server> server;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      server = std::move(server_);
    }
    if (!server) return;
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<long long>(grace * 1e6));
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      StopNow(*server, deadline);
    } else {
      StopNow(*server, deadline);
    }
    server.reset();
  }

  int fd() const { return wake_fd_; }

  // Every event queued since the last call, as (call, kind, payload) tuples: kStart's
  // payload is (method, metadata, deadline or None, peer, first message or None),
  // kMessage's the message, the others None.
  py::list Take() {
    std::deque<Event> events;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      events.swap(events_);
      signalled_ = false;
      std::uint64_t count = 0;
      while (read(wake_fd_, &count, sizeof count) > 0) {
      }
    }
    py::list out;
    for (auto& event : events) {
      py::object payload = py::none();
      if (event.kind == kStart) {
        py::list metadata;
        for (auto& [key, value] : event.metadata) {
          bool binary = key.size() > 4 && key.compare(key.size() - 4, 4, "-bin") == 0;
          if (binary) {
            metadata.append(py::make_tuple(key, py::bytes(value)));
          } else {
            metadata.append(py::make_tuple(key, py::str(value)));
          }
        }
        payload = py::make_tuple(
            event.method, metadata,
            event.deadline < 0 ? py::object(py::none())
                               : py::object(py::float_(event.deadline)),
            event.peer,
            event.has_message ? py::object(ToBytes(event.message)) : py::object(py::none()));
      } else if (event.kind == kMessage) {
        payload = ToBytes(event.message);
      }
      out.append(py::make_tuple(event.call, static_cast<int>(event.kind), payload));
    }
    return out;
  }

  // Read call `id`'s next message (a kMessage or kHalfClose event follows).
  void Read(std::uint64_t id) {
    Use(id, [](Call&) { return std::optional(kStartRead); });
  }

  // Queue `message` on call `id`; true when Python should wait for kWritable before the
  // next write (WRITE_WINDOW messages queued). A call that ended takes nothing.
  bool Write(std::uint64_t id, const py::bytes& message) {
    grpc::ByteBuffer buffer = FromBytes(message);
    bool wait = false;
    Use(id, [&](Call& call) {
      return call.Write(std::move(buffer), wait) ? std::optional(kStartWrite) : std::nullopt;
    });
    return wait;
  }

  // End call `id` with `code`, `details`, `trailing` metadata and, for OK, the `last`
  // message. `now`: Python has no other call in progress; then, unless events wait for
  // Python or operations for the sender, the gRPC operation starts on this thread
  // (saving the sender's wake-up) rather than the sender's.
  void Finish(std::uint64_t id, int code, const std::string& details,
              std::vector<std::pair<std::string, std::string>> trailing,
              const std::optional<py::bytes>& last, bool now) {
    std::optional<grpc::ByteBuffer> buffer;
    if (last) buffer = FromBytes(*last);
    if (code < 0 || code > 16) throw std::invalid_argument("a gRPC status code is 0 to 16");
    grpc::Status status(static_cast<grpc::StatusCode>(code), details);
    Use(
        id,
        [&](Call& call) {
          return call.Finish(std::move(status), std::move(trailing), std::move(buffer))
                     ? std::optional(kStartFinish)
                     : std::nullopt;
        },
        now);
  }

  std::size_t calls() {
    std::lock_guard<std::mutex> lock(mutex_);
    return calls_.size();
  }

  // --- gRPC's side ---------------------------------------------------------------------

  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    std::lock_guard<std::mutex> lock(mutex_);
    std::uint64_t id = next_id_++;
    auto* call = new Call(this, id, context);
    calls_.emplace(id, call);
    return call;
  }

  void Push(Event event) {
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back(std::move(event));
    if (!signalled_) {
      signalled_ = true;
      std::uint64_t one = 1;
      ssize_t written = write(wake_fd_, &one, sizeof one);
      (void)written;  // a full counter already wakes the reader
    }
  }

  void Done(Call* call, std::uint64_t id) {
    bool free = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      calls_.erase(id);
      call->done = true;
      free = call->users == 0;
    }
    if (free) delete call;
  }

 private:
  struct Operation {
    Call* call;
    OperationKind kind;
  };

  // Apply `record` to call `id` if it still exists; it returns the gRPC operation to
  // start, if any, which the sender thread starts (`now`: this thread, when nothing else
  // waits for Python or the sender). The call is kept
  // alive, without the mutex held, while `record` runs and until its operation started.
  template <typename Record>
  void Use(std::uint64_t id, Record&& record, bool now = false) {
    Call* call = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = calls_.find(id);
      if (found == calls_.end()) return;
      call = found->second;
      ++call->users;
    }
    std::optional<OperationKind> started = record(*call);
    if (started && now) {
      bool idle = false;  // no call waits for Python, nothing waits for the sender
      {
        std::lock_guard<std::mutex> lock(mutex_);
        idle = events_.empty() && operations_.empty();
      }
      if (idle) {
        call->Start(*started);
        started.reset();
      }
    }
    bool free = false;
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (started) {
        operations_.push_back({call, *started});
        wake = sender_idle_;
        sender_idle_ = false;
      } else {
        free = --call->users == 0 && call->done;
      }
    }
    if (wake) operations_queued_.notify_one();
    if (free) delete call;
  }

  // The sender thread: start the operations Python asked for, in order, until StopNow.
  void Send() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      while (operations_.empty() && !sender_stop_) {
        sender_idle_ = true;
        operations_queued_.wait(lock);
      }
      sender_idle_ = false;
      if (operations_.empty()) return;  // stopped, and nothing is left to start
      std::deque<Operation> operations;
      operations.swap(operations_);
      lock.unlock();
      for (const auto& operation : operations) operation.call->Start(operation.kind);
      lock.lock();
      for (const auto& operation : operations) {
        if (--operation.call->users == 0 && operation.call->done) delete operation.call;
      }
    }
  }

  // Shut `server` down (the calls in progress have until `deadline`), then the sender
  // once every call is done: until then it starts the operations the calls need to end.
  void StopNow(grpc::Server& server, std::chrono::system_clock::time_point deadline) {
    server.Shutdown(deadline);
    server.Wait();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sender_stop_ = true;
    }
    operations_queued_.notify_one();
    if (sender_.joinable()) sender_.join();
  }

  std::mutex mutex_;
  std::deque<Operation> operations_;  // for the sender thread
  std::condition_variable operations_queued_;
  bool sender_idle_ = false;  // the sender waits for operations_queued_
  bool sender_stop_ = false;
  std::thread sender_;
  std::unique_ptr<grpc::Server> server_;
  std::unordered_map<std::uint64_t, Call*> calls_;
  std::uint64_t next_id_ = 1;
  std::deque<Event> events_;
  bool signalled_ = false;
  const int wake_fd_;
};

void Call::OnReadDone(bool ok) {
  Event event;
  event.call = id_;
  if (!started_) {
    started_ = true;
    event.kind = kStart;
    event.method = context_->method();
    for (const auto& [key, value] : context_->client_metadata()) {
      event.metadata.emplace_back(std::string(key.data(), key.size()),
                                  std::string(value.data(), value.size()));
    }
    auto deadline = context_->deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      auto left = deadline - std::chrono::system_clock::now();
      event.deadline = std::chrono::duration<double>(
                           (std::chrono::steady_clock::now() + left).time_since_epoch())
                           .count();
    }
    event.peer = context_->peer();
    if (ok) {
      event.message = std::move(read_);
      event.has_message = true;
    }
    transport_->Push(std::move(event));
    if (!ok) {
      Event closed;
      closed.call = id_;
      closed.kind = kHalfClose;
      transport_->Push(std::move(closed));
    }
    return;
  }
  if (ok) {
    event.kind = kMessage;
    event.message = std::move(read_);
    event.has_message = true;
  } else {
    event.kind = kHalfClose;
  }
  transport_->Push(std::move(event));
}

void Call::Start(OperationKind kind) {
  switch (kind) {
    case kStartRead:
      ReadNext();
      break;
    case kStartWrite: {
      grpc::ByteBuffer* next = nullptr;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        next = &writes_.front();  // writing_: nothing takes it out before it is sent
      }
      StartWrite(next);
      break;
    }
    case kStartFinish:
      // finish_started_: nothing else touches the status, trailers or writes any more
      for (const auto& [key, value] : trailing_) context_->AddTrailingMetadata(key, value);
      if (write_and_finish_) {
        StartWriteAndFinish(&writes_.front(), grpc::WriteOptions(), status_);
      } else {
        grpc::ServerGenericBidiReactor::Finish(status_);
      }
      break;
  }
}

void Call::ReadNext() {
  // Under the mutex: a finish cannot start before the read is started, so gRPC waits for
  // the read before it calls OnDone (OnReadDone takes no lock of this call).
  std::lock_guard<std::mutex> lock(mutex_);
  if (!finish_started_) StartRead(&read_);
}

bool Call::Write(grpc::ByteBuffer message, bool& wait) {
  std::lock_guard<std::mutex> lock(mutex_);
  wait = false;
  if (finish_requested_ || cancelled_) return false;
  writes_.push_back(std::move(message));
  wait = writable_wanted_ = writes_.size() >= kWriteWindow;
  if (writing_) return false;  // OnWriteDone sends it
  writing_ = true;
  return true;
}

bool Call::Finish(grpc::Status status, std::vector<std::pair<std::string, std::string>> trailing,
                  std::optional<grpc::ByteBuffer> last) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (finish_requested_ || finish_started_) return false;  // finished as cancelled already
  finish_requested_ = true;
  status_ = std::move(status);
  trailing_ = std::move(trailing);
  if (last && !cancelled_) {
    writes_.push_back(std::move(*last));
    if (!writing_ && writes_.size() == 1) {
      // the usual unary answer: message, status and trailers in one operation
      writing_ = true;
      finish_started_ = true;
      write_and_finish_ = true;
      return true;
    }
  }
  if (writing_ || finish_started_) return false;  // OnWriteDone or OnCancel finishes
  finish_started_ = true;
  return true;
}

void Call::OnWriteDone(bool ok) {
  grpc::ByteBuffer* next = nullptr;
  bool finish = false;
  bool writable = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finish_started_) return;  // StartWriteAndFinish's write: OnDone follows
    writes_.pop_front();
    if (writable_wanted_ && (writes_.size() < kWriteWindow || !ok || cancelled_)) {
      writable_wanted_ = false;
      writable = true;
    }
    if (ok && !cancelled_ && !writes_.empty()) {
      next = &writes_.front();
    } else {
      writing_ = false;
      writes_.clear();
      if ((finish_requested_ || cancelled_ || !ok) && !finish_started_) {
        finish_started_ = true;
        finish = true;
        if (!finish_requested_) status_ = grpc::Status(grpc::StatusCode::CANCELLED, "");
      }
    }
  }
  if (writable) {
    Event event;
    event.call = id_;
    event.kind = kWritable;
    transport_->Push(std::move(event));
  }
  if (next != nullptr) {
    StartWrite(next);
  } else if (finish) {
    FinishNow();
  }
}

void Call::OnCancel() {
  bool finish = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cancelled_ = true;
    if (!writing_ && !finish_started_) {
      finish_started_ = true;
      finish = true;
      if (!finish_requested_) status_ = grpc::Status(grpc::StatusCode::CANCELLED, "");
    }
  }
  Event event;
  event.call = id_;
  event.kind = kCancelled;
  transport_->Push(std::move(event));
  if (finish) FinishNow();
}

void Call::FinishNow() {
  for (const auto& [key, value] : trailing_) context_->AddTrailingMetadata(key, value);
  grpc::ServerGenericBidiReactor::Finish(status_);
}

void Call::OnDone() { transport_->Done(this, id_); }

}  // namespace

PYBIND11_MODULE(_transport, module) {
  module.doc() = "The native gRPC transport (serving/frontends/native/transport.cc).";
  module.attr("START") = static_cast<int>(kStart);
  module.attr("MESSAGE") = static_cast<int>(kMessage);
  module.attr("HALF_CLOSE") = static_cast<int>(kHalfClose);
  module.attr("CANCELLED") = static_cast<int>(kCancelled);
  module.attr("WRITABLE") = static_cast<int>(kWritable);
  module.attr("WRITE_WINDOW") = kWriteWindow;
  module.attr("GRPC_VERSION") = grpc::Version();
  py::class_<Transport>(module, "Transport")
      .def(py::init<>())
      .def("start", &Transport::Start, py::arg("address"), py::arg("options"),
           py::arg("private_key") = "", py::arg("certificate") = "",
           py::arg("root_certificates") = "", py::arg("require_client_certificate") = false)
      .def("stop", &Transport::Stop, py::arg("grace"))
      .def("fd", &Transport::fd)
      .def("take", &Transport::Take)
      .def("read", &Transport::Read, py::arg("call"))
      .def("write", &Transport::Write, py::arg("call"), py::arg("message"))
      .def("finish", &Transport::Finish, py::arg("call"), py::arg("code"), py::arg("details"),
           py::arg("trailing"), py::arg("message") = py::none(), py::arg("now") = false)
      .def("calls", &Transport::calls);
}
