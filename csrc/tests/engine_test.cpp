// C++ tests of the lorecomm engine (csrc/engine.cpp), run by ctest and from
// tests/test_engine.py. No Python: N "ranks" are threads of this process joined
// by an in-process c10d Backend (ThreadWorld) that can delay or kill a rank;
// the torch.ops.lorecomm ops are registered here with plain ATen reference
// kernels (the real kernels are tested in tests/; this tests orchestration:
// ordering, asynchrony, selection, accounting, error propagation, shutdown).
#include "engine.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <thread>

using namespace std::chrono_literals;
using lorecomm::engine::BatchSpec;
using lorecomm::engine::Engine;
using lorecomm::engine::Job;
using lorecomm::engine::Phase;

// ------------------------------------------------------------ reference ops
namespace {
at::Tensor probes(const at::Tensor& keys, int64_t rows, int64_t cols) {
  auto off = at::arange(rows * cols, at::kDouble).view({1, rows, cols});
  auto k = keys.to(at::kDouble).remainder(1000.0).view({-1, 1, 1});
  return at::sin(off * 0.7 + k * 1.3).to(at::kFloat);
}
at::Tensor score_paper(const at::Tensor& G, const at::Tensor& E, const at::Tensor& U, const at::Tensor& keys) {
  auto H = G.to(at::kFloat) + E;
  auto Z = at::matmul(U.transpose(-1, -2), H);
  return (Z * probes(keys, G.size(1), G.size(2))).sum(-1);
}
at::Tensor score_sketch(const at::Tensor& G, const at::Tensor& E, const at::Tensor& U, const at::Tensor& keys,
                        int64_t k) {
  auto H = G.to(at::kFloat) + E;
  return at::matmul(U.transpose(-1, -2), at::matmul(H, probes(keys, G.size(2), k)));
}
void project_residual(const at::Tensor& G, const at::Tensor& E, const at::Tensor& P, const at::Tensor& R,
                      const at::Tensor& ok) {
  auto H = G.to(at::kFloat) + E;
  auto Rn = at::matmul(P.transpose(-1, -2), H);
  R.copy_(Rn);
  E.copy_(at::where(ok, H - at::matmul(P, Rn), E));
}
void decompress(const at::Tensor& P, const at::Tensor& Rbar, const at::Tensor& out) {
  out.copy_(at::matmul(P, Rbar));
}
// the next refresh_basis call (whichever rank's) perturbs its result in the last bits
std::atomic<bool> perturb_next_basis{false};
at::Tensor refresh_basis(const at::Tensor& H) {
  auto h = H.to(at::kDouble);
  auto eye = at::eye(H.size(1), at::kDouble);
  auto U = std::get<0>(at::linalg_qr(at::matmul(h, h.transpose(-1, -2)) + eye)).to(at::kFloat);
  if (perturb_next_basis.exchange(false)) U.mul_(1 + 1e-6);
  return U;
}
}  // namespace

TORCH_LIBRARY(lorecomm, m) {
  m.def("score_paper(Tensor G, Tensor E, Tensor U, Tensor keys) -> Tensor");
  m.def("score_sketch(Tensor G, Tensor E, Tensor U, Tensor keys, int k) -> Tensor");
  m.def("project_residual(Tensor G, Tensor(a!) E, Tensor P, Tensor(b!) R, Tensor ok) -> ()");
  m.def("decompress(Tensor P, Tensor Rbar, Tensor(a!) out) -> ()");
  m.def("refresh_basis(Tensor H) -> Tensor");
}
TORCH_LIBRARY_IMPL(lorecomm, CPU, m) {
  m.impl("score_paper", &score_paper);
  m.impl("score_sketch", &score_sketch);
  m.impl("project_residual", &project_residual);
  m.impl("decompress", &decompress);
  m.impl("refresh_basis", &refresh_basis);
}

// --------------------------------------------------- in-process thread world
struct ThreadWorld {
  explicit ThreadWorld(int n, std::chrono::milliseconds timeout) : n(n), timeout(timeout), bufs(n) {}
  int n;
  std::chrono::milliseconds timeout;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  int64_t gen = 0;
  std::vector<at::Tensor> bufs;
  at::Tensor result;
  std::set<int> dead;
  std::atomic<int64_t> collectives{0};
  std::function<void(int)> before_collective;  // test hook: delay a rank

  // kind: "sum", "max" (all-reduce) or "bcast" (from rank 0)
  void all_reduce(int rank, at::Tensor& t, const std::string& kind = "sum") {
    if (before_collective) before_collective(rank);
    std::unique_lock<std::mutex> g(mu);
    if (dead.count(rank)) throw std::runtime_error("ThreadWorld: this rank is dead");
    const int64_t my_gen = gen;
    bufs[rank] = t;
    if (++arrived == n) {
      at::Tensor acc = bufs[0].clone();
      for (int r = 1; r < n && kind != "bcast"; ++r) {  // fixed order: identical on every rank
        if (kind == "max")
          acc = at::maximum(acc, bufs[r]);
        else
          acc.add_(bufs[r]);
      }
      result = acc;
      arrived = 0;
      ++gen;
      ++collectives;
      cv.notify_all();
    } else if (!cv.wait_for(g, timeout, [&] { return gen != my_gen || dead.size() > 0; }) || gen == my_gen) {
      --arrived;
      throw std::runtime_error(dead.empty() ? "ThreadWorld: timed out waiting for peers"
                                            : "ThreadWorld: connection closed by peer (a rank died)");
    }
    t.copy_(result);
  }
  void kill(int rank) {
    std::lock_guard<std::mutex> g(mu);
    dead.insert(rank);
    cv.notify_all();
  }
};

struct DoneWork : c10d::Work {
  bool wait(std::chrono::milliseconds) override { return true; }
};

struct ThreadBackend : c10d::Backend {
  ThreadBackend(std::shared_ptr<ThreadWorld> w, int rank) : c10d::Backend(rank, w->n), world(std::move(w)) {}
  const std::string getBackendName() const override { return "thread-world"; }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& ts, const c10d::AllreduceOptions& o) override {
    TORCH_CHECK(o.reduceOp == c10d::ReduceOp::SUM || o.reduceOp == c10d::ReduceOp::MAX, "ThreadWorld: SUM or MAX");
    world->all_reduce(getRank(), ts.at(0), o.reduceOp == c10d::ReduceOp::MAX ? "max" : "sum");
    ++ops[o.reduceOp == c10d::ReduceOp::MAX ? "max" : "sum"];
    return c10::make_intrusive<DoneWork>();
  }
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& ts, const c10d::BroadcastOptions& o) override {
    TORCH_CHECK(o.rootRank == 0, "ThreadWorld: broadcast from rank 0 only");
    world->all_reduce(getRank(), ts.at(0), "bcast");
    ++ops["bcast"];
    return c10::make_intrusive<DoneWork>();
  }
  std::map<std::string, int> ops;  // collectives this rank issued, by kind
  std::shared_ptr<ThreadWorld> world;
};

c10::intrusive_ptr<c10d::ProcessGroup> make_pg(const std::shared_ptr<ThreadWorld>& w, int rank) {
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(rank, w->n);
  auto be = c10::make_intrusive<ThreadBackend>(w, rank);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, be);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  return pg;
}

// ------------------------------------------------------------------ harness
static int failures = 0;
#define EXPECT(cond, ...)                                                                     \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      ++failures;                                                                             \
      std::cerr << __FILE__ << ":" << __LINE__ << ": FAILED " #cond " " << __VA_ARGS__ << "\n"; \
    }                                                                                         \
  } while (0)

std::string error_of(const c10::intrusive_ptr<c10::ivalue::Future>& f) {
  f->wait();
  return f->hasError() ? f->tryRetrieveErrorMessage() : std::string();
}

// One compressed bucket: two 6x10 matrices batched (B=2, a=6, b=10) + one
// transposed 12x4 (a=4, b=12) + 7 dense leftovers, r = 2.
struct Bucket {
  at::Tensor buffer;
  std::vector<BatchSpec> batches;
  std::vector<std::pair<int64_t, int64_t>> dense;
};
Bucket make_bucket(int rank, int64_t step) {
  Bucket bk;
  const int64_t n1 = 2 * 60, n2 = 48, nd = 7;
  auto g = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + step);
  bk.buffer = at::randn({n1 + n2 + nd}, g, at::kFloat);
  auto base = bk.buffer;
  at::Tensor G1 = base.as_strided({2, 6, 10}, {60, 10, 1}, 0);
  at::Tensor G2 = base.as_strided({1, 12, 4}, {48, 4, 1}, n1).transpose(1, 2);  // oriented (1, 4, 12)
  for (auto [G, a, b] : {std::tuple{G1, 6, 10}, std::tuple{G2, 4, 12}}) {
    BatchSpec s;
    s.G = G;
    s.E = at::zeros({G.size(0), a, b});
    s.U = std::get<0>(at::linalg_qr(at::randn({G.size(0), a, a}, at::make_generator<at::CPUGeneratorImpl>(7)))).contiguous();
    s.keys = at::arange(G.size(0), at::kLong) + step * 10;
    s.rank = 2;
    bk.batches.push_back(s);
  }
  bk.dense = {{n1 + n2, n1 + n2 + nd}};
  return bk;
}

template <class F>
void on_ranks(int n, F f) {
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back(f, r);
  for (auto& t : ts) t.join();
}

void test_dense_mean() {
  auto w = std::make_shared<ThreadWorld>(2, 5000ms);
  std::vector<at::Tensor> out(2);
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r));
    Job j;
    j.buffer = at::full({1000}, float(r + 1));
    auto f = e.submit(std::move(j));
    EXPECT(error_of(f).empty(), error_of(f));
    out[r] = f->value().toTensor();
  });
  EXPECT(at::allclose(out[0], at::full({1000}, 1.5f)), "dense mean wrong");
  EXPECT(at::equal(out[0], out[1]), "ranks differ");
}

// The engine's compressed step equals the same maths written out here.
void test_compressed_matches_reference(int64_t sketch_k, bool ef) {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> eng(N), ref(N);
  for (int r = 0; r < N; ++r) {
    eng[r] = make_bucket(r, 3);
    ref[r] = make_bucket(r, 3);
  }
  std::vector<at::Tensor> oks(N);
  on_ranks(N, [&](int r) {
    Engine e(make_pg(w, r));
    for (int step = 0; step < 3; ++step) {  // E carries over between steps
      Job j;
      j.phase = Phase::Compressed;
      j.buffer = eng[r].buffer;
      j.batches = eng[r].batches;
      j.dense_ranges = eng[r].dense;
      j.sketch_k = sketch_k;
      j.error_feedback = ef;
      oks[r] = at::empty({}, at::kBool);
      j.ok_out = oks[r];
      auto f = e.submit(std::move(j));
      EXPECT(error_of(f).empty(), error_of(f));
      if (step < 2) eng[r].buffer.copy_(make_bucket(r, 4 + step).buffer);
    }
  });
  // reference: all ranks in one thread, same op order
  for (int step = 0; step < 3; ++step) {
    std::vector<at::Tensor> flats(N);
    for (int r = 0; r < N; ++r) {
      std::vector<at::Tensor> sc;
      for (auto& b : ref[r].batches)
        sc.push_back((sketch_k ? score_sketch(b.G, b.E, b.U, b.keys, sketch_k) : score_paper(b.G, b.E, b.U, b.keys))
                         .reshape({-1}));
      flats[r] = at::cat(sc).div_(N);
    }
    at::Tensor flat = flats[0].clone();
    for (int r = 1; r < N; ++r) flat.add_(flats[r]);
    std::vector<at::Tensor> comms(N);
    std::vector<std::vector<at::Tensor>> Ps(N);
    for (int r = 0; r < N; ++r) {
      int64_t pos = 0;
      std::vector<at::Tensor> parts;
      for (auto& b : ref[r].batches) {
        const int64_t B = b.G.size(0), a = b.G.size(1), n = b.G.size(2);
        auto lbar = flat.narrow(0, pos, (sketch_k ? B * a * sketch_k : B * a)).view({B, a, -1});
        pos += lbar.numel();
        auto J = std::get<1>(lbar.square().mean(-1).sort(true, -1, true)).narrow(-1, 0, b.rank);
        auto P = b.U.gather(2, J.unsqueeze(1).expand({B, a, b.rank}));
        auto R = at::empty({B, b.rank, n});
        project_residual(b.G, b.E, P, R, at::scalar_tensor(ef, at::kBool));
        Ps[r].push_back(P);
        parts.push_back(R.reshape({-1}));
      }
      for (auto [s, e] : ref[r].dense) parts.push_back(ref[r].buffer.narrow(0, s, e - s));
      comms[r] = at::cat(parts).div_(N);
    }
    at::Tensor comm = comms[0].clone();
    for (int r = 1; r < N; ++r) comm.add_(comms[r]);
    for (int r = 0; r < N; ++r) {
      int64_t pos = 0;
      for (size_t i = 0; i < ref[r].batches.size(); ++i) {
        auto& b = ref[r].batches[i];
        auto n = b.G.size(0) * b.rank * b.G.size(2);
        decompress(Ps[r][i], comm.narrow(0, pos, n).view({b.G.size(0), b.rank, b.G.size(2)}), b.G);
        pos += n;
      }
      for (auto [s, e] : ref[r].dense) {
        ref[r].buffer.narrow(0, s, e - s).copy_(comm.narrow(0, pos, e - s));
        pos += e - s;
      }
      if (step < 2) ref[r].buffer.copy_(make_bucket(r, 4 + step).buffer);
    }
  }
  for (int r = 0; r < N; ++r) {
    EXPECT(at::equal(eng[r].buffer, ref[r].buffer), "k=" << sketch_k << " rank " << r << ": bucket differs");
    for (size_t i = 0; i < eng[r].batches.size(); ++i)
      EXPECT(at::equal(eng[r].batches[i].E, ref[r].batches[i].E), "rank " << r << ": E differs");
    EXPECT(oks[r].item<bool>(), "ok flag");
  }
  EXPECT(at::equal(eng[0].buffer, eng[1].buffer), "ranks disagree");
  EXPECT(ef || at::equal(eng[0].batches[0].E, at::zeros_like(eng[0].batches[0].E)), "E must stay 0 without EF");
}

void test_nonfinite_step_is_poisoned() {
  auto w = std::make_shared<ThreadWorld>(2, 5000ms);
  std::vector<Bucket> bk{make_bucket(0, 1), make_bucket(1, 1)};
  bk[1].buffer[3] = std::nan("");
  std::vector<at::Tensor> oks(2);
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r));
    Job j;
    j.phase = Phase::Compressed;
    j.buffer = bk[r].buffer;
    j.batches = bk[r].batches;
    j.dense_ranges = bk[r].dense;
    oks[r] = at::empty({}, at::kBool);
    j.ok_out = oks[r];
    auto f = e.submit(std::move(j));
    EXPECT(error_of(f).empty(), error_of(f));
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT(!oks[r].item<bool>(), "non-finite step must report ok=false");
    EXPECT(!at::isfinite(bk[r].buffer.narrow(0, 0, 168)).all().item<bool>(), "factors must be NaN");
    EXPECT(at::equal(bk[r].batches[0].E, at::zeros_like(bk[r].batches[0].E)), "E must not be poisoned");
  }
}

// A refresh: mean of G + E, a new basis per batch, E = 0, checksums; a basis that
// differs on one rank is broadcast from rank 0.
void test_refresh(bool perturb) {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> bk{make_bucket(0, 2), make_bucket(1, 2)};
  std::vector<at::Tensor> expect_mean(1), oks(N), repairs(N);
  // expected: the mean of G + E (E = 0.5 on every rank)
  for (auto& b : bk)
    for (auto& s : b.batches) s.E.fill_(0.5);
  at::Tensor mean = at::zeros_like(bk[0].buffer);
  for (int r = 0; r < N; ++r) {
    at::Tensor h = bk[r].buffer.clone();
    for (auto& s : bk[r].batches)
      h.as_strided(s.G.sizes(), s.G.strides(), s.G.storage_offset()).add_(s.E);
    mean.add_(h.div_(N));
  }
  perturb_next_basis = perturb;
  std::vector<std::map<std::string, int>> ops(N);
  on_ranks(N, [&](int r) {
    auto pg = make_pg(w, r);
    Engine e(pg);
    Job j;
    j.phase = Phase::Refresh;
    j.buffer = bk[r].buffer;
    j.batches = bk[r].batches;
    oks[r] = at::empty({}, at::kBool);
    repairs[r] = at::full({2}, -1, at::kLong);
    j.ok_out = oks[r];
    j.repairs_out = repairs[r];
    auto f = e.submit(std::move(j));
    EXPECT(error_of(f).empty(), error_of(f));
    ops[r] = static_cast<ThreadBackend*>(pg->getDefaultBackend().get())->ops;
  });
  for (int r = 0; r < N; ++r) {
    EXPECT(at::allclose(bk[r].buffer, mean, 1e-6, 1e-6), "rank " << r << ": bucket is not the mean of G + E");
    EXPECT(oks[r].item<bool>(), "ok flag");
    for (size_t i = 0; i < bk[r].batches.size(); ++i) {
      const auto& s = bk[r].batches[i];
      EXPECT(at::equal(s.E, at::zeros_like(s.E)), "E must be reset");
      EXPECT(at::equal(s.U, bk[0].batches[i].U), "rank " << r << ": basis " << i << " differs from rank 0's");
      at::Tensor hbar = mean.as_strided(s.G.sizes(), s.G.strides(), s.G.storage_offset());
      if (!perturb) EXPECT(at::equal(s.U, refresh_basis(hbar)), "basis " << i << " is not refresh_basis(mean)");
    }
    // checksums: one MAX all-reduce; a repair broadcasts only the batch that differed (the first one called)
    const int64_t want_repairs = perturb ? 1 : 0;
    EXPECT(repairs[r].sum().item<int64_t>() == want_repairs, "repairs " << repairs[r]);
    EXPECT(ops[r]["max"] == 1 && ops[r]["sum"] == 1 && ops[r]["bcast"] == want_repairs,
           "collectives: sum " << ops[r]["sum"] << " max " << ops[r]["max"] << " bcast " << ops[r]["bcast"]);
  }
}

// Given selections (the fixed / random ablations): no scores, one-float finite flag, then as greedy.
void test_given_selection() {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> bk{make_bucket(0, 5), make_bucket(1, 5)};
  std::vector<at::Tensor> in(N);
  for (int r = 0; r < N; ++r) in[r] = bk[r].buffer.clone();
  std::vector<std::map<std::string, int>> ops(N);
  on_ranks(N, [&](int r) {
    auto pg = make_pg(w, r);
    Engine e(pg);
    Job j;
    j.phase = Phase::Compressed;
    j.buffer = bk[r].buffer;
    j.batches = bk[r].batches;
    for (auto& s : j.batches) s.picks = at::tensor({3, 0}, at::kLong).expand({s.G.size(0), 2});
    j.dense_ranges = bk[r].dense;
    auto f = e.submit(std::move(j));
    EXPECT(error_of(f).empty(), error_of(f));
    ops[r] = static_cast<ThreadBackend*>(pg->getDefaultBackend().get())->ops;
  });
  // reference: R = P^T G (E = 0), mean over ranks, G = P Rbar
  for (size_t i = 0; i < bk[0].batches.size(); ++i) {
    const auto& s = bk[0].batches[i];
    at::Tensor P = s.U.index_select(2, at::tensor({3, 0}, at::kLong));
    at::Tensor Rbar = at::zeros({s.G.size(0), 2, s.G.size(2)});
    for (int r = 0; r < N; ++r) {
      const auto& G = bk[r].batches[i].G;
      at::Tensor G0 = in[r].as_strided(G.sizes(), G.strides(), G.storage_offset());
      Rbar.add_(at::matmul(P.transpose(-1, -2), G0) / N);
    }
    EXPECT(at::allclose(s.G, at::matmul(P, Rbar), 1e-5, 1e-5), "batch " << i << " is not P Rbar");
  }
  EXPECT(at::equal(bk[0].buffer, bk[1].buffer), "ranks disagree");
  EXPECT(ops[0]["sum"] == 2 && ops[0].count("max") == 0, "flag + factor all-reduces, no scores");
}

void test_async_and_ordered() {
  // submit returns at once; jobs run in order; the worker is busy while the caller goes on
  auto w = std::make_shared<ThreadWorld>(2, 5000ms);
  w->before_collective = [](int r) {
    if (r == 1) std::this_thread::sleep_for(50ms);
  };
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r));
    std::vector<c10::intrusive_ptr<c10::ivalue::Future>> fs;
    const double t0 = Engine::now_s();
    for (int i = 0; i < 4; ++i) {
      Job j;
      j.buffer = at::full({16}, float(i));
      fs.push_back(e.submit(std::move(j)));
    }
    const double submit_time = Engine::now_s() - t0;
    EXPECT(submit_time < 0.04, "submit blocked for " << submit_time << " s");
    EXPECT(!fs.back()->completed(), "last job finished before the delayed collectives could");
    e.drain();
    EXPECT(e.pending() == 0 && e.jobs_done() == 4, "drain");
    for (int i = 0; i < 4; ++i) EXPECT(fs[i]->value().toTensor()[0].item<float>() == float(i), "order");
    auto tl = e.timeline(true);
    EXPECT(tl.size() == 4, "timeline");
    for (size_t i = 1; i < tl.size(); ++i) EXPECT(tl[i].start_s >= tl[i - 1].end_s, "jobs overlapped");
    EXPECT(e.busy_seconds() > 0.1, "busy " << e.busy_seconds());
  });
}

void test_bad_tensor_errors_future() {
  auto w = std::make_shared<ThreadWorld>(1, 1000ms);
  Engine e(make_pg(w, 0));
  Bucket bk = make_bucket(0, 1);
  bk.batches[0].E = at::zeros({3, 3});
  Job j;
  j.phase = Phase::Compressed;
  j.buffer = bk.buffer;
  j.batches = bk.batches;
  j.label = "bucket 7";
  auto msg = error_of(e.submit(std::move(j)));
  EXPECT(msg.find("bucket 7") != std::string::npos && msg.find("bad input") != std::string::npos &&
             msg.find("E must be float32") != std::string::npos,
         "message: " << msg);
  EXPECT(msg.find("Exception raised from") == std::string::npos, "no C++ backtrace in the message: " << msg);
  // a rejected bucket poisons the engine (its peers' collectives are now out of step) until reset()
  Job k;
  k.buffer = at::zeros({4}, at::kInt);
  msg = error_of(e.submit(std::move(k)));
  EXPECT(msg.find("earlier bucket failed") != std::string::npos, msg);
  e.reset();
  Job l;
  l.buffer = at::zeros({4}, at::kInt);
  msg = error_of(e.submit(std::move(l)));
  EXPECT(msg.find("dtype must be float32") != std::string::npos, msg);
}

void test_dead_peer_errors_within_timeout() {
  auto w = std::make_shared<ThreadWorld>(2, 800ms);
  auto pg0 = make_pg(w, 0);
  Engine e(pg0);
  const double t0 = Engine::now_s();
  Job j;
  j.buffer = at::ones({8});
  j.label = "bucket 0";
  auto f = e.submit(std::move(j));  // rank 1 never joins
  auto msg = error_of(f);
  const double dt = Engine::now_s() - t0;
  EXPECT(!msg.empty() && msg.find("timed out") != std::string::npos && msg.find("all-reduce") != std::string::npos,
         "message: " << msg);
  EXPECT(dt < 3.0, "took " << dt << " s");
  // later buckets fail fast, naming the first cause
  Job k;
  k.buffer = at::ones({8});
  msg = error_of(e.submit(std::move(k)));
  EXPECT(msg.find("earlier bucket failed") != std::string::npos, msg);
  EXPECT(e.failure().has_value(), "failure recorded");
  // a peer that dies mid-wait is reported as such
  auto w2 = std::make_shared<ThreadWorld>(2, 10000ms);
  Engine e2(make_pg(w2, 0));
  Job m;
  m.buffer = at::ones({8});
  auto f2 = e2.submit(std::move(m));
  std::this_thread::sleep_for(100ms);
  const double t1 = Engine::now_s();
  w2->kill(1);
  msg = error_of(f2);
  EXPECT(msg.find("died") != std::string::npos, msg);
  EXPECT(Engine::now_s() - t1 < 2.0, "dead peer not noticed promptly");
}

void test_engine_timeout_bounds_wait() {
  // a backend whose work never finishes on its own: the engine's timeout still fires
  struct NeverWork : c10d::Work {
    bool wait(std::chrono::milliseconds t) override {
      std::this_thread::sleep_for(t.count() ? t : 100000ms);
      throw std::runtime_error("Work timed out after " + std::to_string(t.count()) + " ms");
    }
  };
  struct Stuck : c10d::Backend {
    Stuck() : c10d::Backend(0, 2) {}
    c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>&, const c10d::AllreduceOptions&) override {
      return c10::make_intrusive<NeverWork>();
    }
  };
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(0, 2);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, c10::make_intrusive<Stuck>());
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  Engine e(pg, 300ms);
  Job j;
  j.buffer = at::ones({4});
  const double t0 = Engine::now_s();
  auto msg = error_of(e.submit(std::move(j)));
  EXPECT(msg.find("timed out") != std::string::npos && msg.find("300 ms") != std::string::npos, msg);
  EXPECT(Engine::now_s() - t0 < 2.0, "timeout not respected");
}

void test_shutdown_fails_pending() {
  auto w = std::make_shared<ThreadWorld>(2, 2000ms);
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> fs;
  {
    Engine e(make_pg(w, 0));
    for (int i = 0; i < 3; ++i) {
      Job j;
      j.buffer = at::ones({4});
      fs.push_back(e.submit(std::move(j)));
    }
  }  // destructor: the running one times out, the queued ones fail; nothing hangs
  for (auto& f : fs) EXPECT(!error_of(f).empty(), "pending job must fail at shutdown");
}

void test_shutdown_releases_group() {
  // a stopped engine must not keep the group (and its backend threads) alive
  auto w = std::make_shared<ThreadWorld>(1, 2000ms);
  auto pg = make_pg(w, 0);
  Engine e(pg);
  Job j;
  j.buffer = at::ones({4});
  EXPECT(error_of(e.submit(std::move(j))).empty(), "a job on a 1-rank group must succeed");
  e.drain();
  EXPECT(pg.use_count() == 2, "the engine holds the group while running");
  e.shutdown();
  EXPECT(pg.use_count() == 1, "shutdown must release the group");
  EXPECT(e.world_size() == 1, "world size stays known after shutdown");
  Job late;
  late.buffer = at::ones({4});
  EXPECT(!error_of(e.submit(std::move(late))).empty(), "submit after shutdown must fail");
}

int main() {
  at::set_num_threads(1);
  struct T {
    const char* name;
    std::function<void()> fn;
  } tests[] = {
      {"dense_mean", test_dense_mean},
      {"compressed_paper_matches_reference", [] { test_compressed_matches_reference(0, true); }},
      {"compressed_sketch_matches_reference", [] { test_compressed_matches_reference(3, true); }},
      {"compressed_no_error_feedback", [] { test_compressed_matches_reference(0, false); }},
      {"nonfinite_step_is_poisoned", test_nonfinite_step_is_poisoned},
      {"refresh_matches_reference", [] { test_refresh(false); }},
      {"refresh_repairs_a_differing_basis", [] { test_refresh(true); }},
      {"given_selection", test_given_selection},
      {"async_and_ordered", test_async_and_ordered},
      {"bad_tensor_errors_future", test_bad_tensor_errors_future},
      {"dead_peer_errors_within_timeout", test_dead_peer_errors_within_timeout},
      {"engine_timeout_bounds_wait", test_engine_timeout_bounds_wait},
      {"shutdown_fails_pending", test_shutdown_fails_pending},
      {"shutdown_releases_group", test_shutdown_releases_group},
  };
  for (auto& t : tests) {
    const int before = failures;
    try {
      t.fn();
    } catch (const std::exception& e) {
      ++failures;
      std::cerr << t.name << ": exception: " << e.what() << "\n";
    }
    std::cout << (failures == before ? "PASS " : "FAIL ") << t.name << std::endl;
  }
  std::cout << (failures ? "FAILED" : "OK") << " (" << failures << " failures)" << std::endl;
  return failures ? 1 : 0;
}
