// C++ tests of the lorecomm engine (csrc/engine.cpp) and its steps
// (csrc/steps/), run by ctest and from tests/test_engine.py. No Python: N
// "ranks" are threads of this process joined by an in-process c10d Backend
// (ThreadWorld) that can delay or kill a rank, or pretend to be another
// backend. The real op kernels (csrc/ops.cpp, basis.cpp, keys.cpp) are linked
// in; a CPU kernel registered here for refresh_basis can perturb one rank's
// basis. This tests orchestration: ordering, asynchrony, inline mode, byte and
// collective accounting, identical replicas, non-finite steps, error
// propagation and messages, timeouts, shutdown (also of a stuck worker).
#include "engine.h"
#include "steps/steps.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <cmath>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <thread>

using namespace std::chrono_literals;
using lorecomm::engine::Engine;
using lorecomm::engine::Step;
namespace st = lorecomm::steps;

// ------------------------------------------------ refresh_basis, perturbable
namespace {
// the next refresh_basis call (whichever rank's) perturbs its result in the last bits
std::atomic<bool> perturb_next_basis{false};
at::Tensor refresh_basis_cpu(const at::Tensor& H) {
  auto h = at::nan_to_num(H.to(at::kDouble), 0.0, 0.0, 0.0);
  auto U = std::get<1>(at::linalg_eigh(at::matmul(h, h.transpose(-1, -2)))).flip({-1}).to(at::kFloat).contiguous();
  if (perturb_next_basis.exchange(false)) U.mul_(1 + 1e-6);
  return U;
}
}  // namespace

TORCH_LIBRARY_IMPL(lorecomm, CPU, m) { m.impl("refresh_basis", &refresh_basis_cpu); }

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
  std::function<void(int)> before_collective;  // test hook: delay a rank

  // kind: "sum", "max" (all-reduce) or "bcast" (from rank 0)
  void all_reduce(int rank, at::Tensor& t, const std::string& kind = "sum") {
    if (before_collective) before_collective(rank);
    std::unique_lock<std::mutex> g(mu);
    if (dead.count(rank)) throw std::runtime_error("ThreadWorld: this rank is dead");
    const int64_t my_gen = gen;
    bufs[rank] = t;
    if (++arrived == n) {
      for (int r = 1; r < n; ++r)
        if (bufs[r].numel() != bufs[0].numel())
          throw std::runtime_error("ThreadWorld: Received data size doesn't match expected size");
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
  ThreadBackend(std::shared_ptr<ThreadWorld> w, int rank, std::string name)
      : c10d::Backend(rank, w->n), world(std::move(w)), name(std::move(name)) {}
  const std::string getBackendName() const override { return name; }
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
  std::string name;
};

c10::intrusive_ptr<c10d::ProcessGroup> make_pg(const std::shared_ptr<ThreadWorld>& w, int rank,
                                               const std::string& name = "thread-world") {
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(rank, w->n);
  auto be = c10::make_intrusive<ThreadBackend>(w, rank, name);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, be);
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  return pg;
}

std::map<std::string, int>& ops_of(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return static_cast<ThreadBackend*>(pg->getDefaultBackend().get())->ops;
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

template <class F>
void on_ranks(int n, F f) {
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back(f, r);
  for (auto& t : ts) t.join();
}

// One bucket: two 6x10 matrices batched (B=2, a=6, b=10) + one transposed
// 12x4 (a=4, b=12) + 7 dense leftovers.
struct Bucket {
  at::Tensor buffer;
  std::vector<st::Batch> batches;
  st::Ranges dense;
};
constexpr int64_t kN1 = 2 * 60, kN2 = 48, kND = 7;

at::Tensor grad(int rank, int64_t step) {
  auto g = at::make_generator<at::CPUGeneratorImpl>(1000 * rank + step);
  return at::randn({kN1 + kN2 + kND}, g, at::kFloat);
}

Bucket make_bucket(int rank, int64_t step, int64_t r = 2) {
  Bucket bk;
  bk.buffer = grad(rank, step);
  at::Tensor G1 = bk.buffer.as_strided({2, 6, 10}, {60, 10, 1}, 0);
  at::Tensor G2 = bk.buffer.as_strided({1, 12, 4}, {48, 4, 1}, kN1).transpose(1, 2);  // oriented (1, 4, 12)
  int64_t id = 0;
  for (auto [G, a, b] : {std::tuple{G1, 6, 10}, std::tuple{G2, 4, 12}}) {
    st::Batch s;
    s.G = G;
    s.E = at::zeros({G.size(0), a, b});
    s.ids = at::arange(id, id + G.size(0), at::kLong);
    id += G.size(0);
    s.rank = r;
    s.U = at::eye(a).expand({G.size(0), a, a}).contiguous();
    s.Q = at::randn({G.size(0), r, b}, at::make_generator<at::CPUGeneratorImpl>(7));
    bk.batches.push_back(s);
  }
  bk.dense = {{kN1 + kN2, kN1 + kN2 + kND}};
  return bk;
}

std::shared_ptr<st::DenseStep> dense_step(at::Tensor buf) {
  auto s = std::make_shared<st::DenseStep>();
  s->buffer = std::move(buf);
  return s;
}

std::shared_ptr<st::GreedyLoreStep> greedy_step(const Bucket& bk, bool refresh, int64_t step, int64_t k = 0,
                                                const std::string& selection = "greedy", bool ef = true) {
  auto s = std::make_shared<st::GreedyLoreStep>();
  s->refresh = refresh;
  s->buffer = bk.buffer;
  s->batches = bk.batches;
  s->dense_ranges = bk.dense;
  s->selection = selection;
  s->sketch_k = k;
  s->error_feedback = ef;
  s->seed = 3;
  s->step = step;
  s->ok = at::empty({}, at::kBool);
  return s;
}

std::shared_ptr<st::LoreStep> lore_step(const Bucket& bk, int64_t step, int64_t explore = 1,
                                        at::ScalarType wire = at::kBFloat16) {
  auto s = std::make_shared<st::LoreStep>();
  s->buffer = bk.buffer;
  s->batches = bk.batches;
  s->dense_ranges = bk.dense;
  s->wire = wire;
  s->explore = explore;
  s->seed = 3;
  s->step = step;
  s->ok = at::empty({}, at::kBool);
  return s;
}

// ------------------------------------------------------------------- tests
void test_dense_mean(bool inline_mode) {
  auto w = std::make_shared<ThreadWorld>(2, 5000ms);
  std::vector<at::Tensor> out(2);
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r), 0ms, inline_mode);
    auto s = dense_step(at::full({1000}, float(r + 1)));
    auto f = e.submit(s);
    if (inline_mode) EXPECT(f->completed(), "an inline step is done when submit returns");
    EXPECT(error_of(f).empty(), error_of(f));
    out[r] = f->value().toTensor();
    EXPECT(s->bytes_sent == 4000 && s->collectives == 1, "bytes " << s->bytes_sent << " collectives " << s->collectives);
  });
  EXPECT(at::allclose(out[0], at::full({1000}, 1.5f)), "dense mean wrong");
  EXPECT(at::equal(out[0], out[1]), "ranks differ");
}

void test_dense_wire() {
  auto w = std::make_shared<ThreadWorld>(2, 5000ms);
  std::vector<at::Tensor> out(2), in(2);
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r));
    in[r] = grad(r, 1);
    auto s = dense_step(in[r].clone());
    s->wire = at::kBFloat16;
    EXPECT(error_of(e.submit(s)).empty(), "dense bf16");
    out[r] = s->buffer;
    EXPECT(s->bytes_sent == 2 * in[r].numel(), "bf16 bytes " << s->bytes_sent);
  });
  auto want = (in[0].to(at::kBFloat16).div(2) + in[1].to(at::kBFloat16).div(2)).to(at::kFloat);
  EXPECT(at::equal(out[0], want) && at::equal(out[0], out[1]), "bf16 wire mean");
}

// GreedyLore's compressed step equals the same op calls and sums written out here.
void test_greedy_compressed_matches_reference(int64_t k) {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> eng(N), ref(N);
  for (int r = 0; r < N; ++r) {
    eng[r] = make_bucket(r, 3);
    ref[r] = make_bucket(r, 3);
  }
  on_ranks(N, [&](int r) {
    Engine e(make_pg(w, r));
    auto s = greedy_step(eng[r], false, 5, k);
    EXPECT(error_of(e.submit(s)).empty(), "greedy step");
    EXPECT(s->ok.item<bool>(), "ok flag");
    int64_t nscores = 0, nfac = 0;
    for (auto& b : eng[r].batches) {
      nscores += b.B() * b.a() * std::max<int64_t>(k, 1);
      nfac += b.B() * b.rank * b.b();
    }
    EXPECT(s->bytes_sent == 4 * (nscores + nfac + kND) && s->collectives == 2, "greedy bytes " << s->bytes_sent);
  });
  std::vector<at::Tensor> flats(N);
  for (int r = 0; r < N; ++r) {
    std::vector<at::Tensor> sc;
    for (auto& b : ref[r].batches) {
      auto keys = st::keys_for(b, 3, 5, 0);
      sc.push_back((k ? st::call1("lorecomm::score_sketch", {b.G, b.E, b.U, keys, k})
                      : st::call1("lorecomm::score_paper", {b.G, b.E, b.U, keys}))
                       .reshape({-1}));
    }
    flats[r] = at::cat(sc).div_(N);
  }
  at::Tensor flat = flats[0] + flats[1];
  std::vector<at::Tensor> comms(N);
  std::vector<std::vector<at::Tensor>> Ps(N);
  for (int r = 0; r < N; ++r) {
    int64_t pos = 0;
    std::vector<at::Tensor> parts;
    for (auto& b : ref[r].batches) {
      const int64_t B = b.B(), a = b.a(), n = b.b();
      auto lbar = flat.narrow(0, pos, B * a * std::max<int64_t>(k, 1)).view({B, a, -1});
      pos += lbar.numel();
      auto J = std::get<1>(lbar.square().mean(-1).sort(true, -1, true)).narrow(-1, 0, b.rank);
      auto P = b.U.gather(2, J.unsqueeze(1).expand({B, a, b.rank}));
      auto R = at::empty({B, b.rank, n});
      st::call0("lorecomm::project_residual", {b.G, b.E, P, R, at::scalar_tensor(true, at::kBool)});
      Ps[r].push_back(P);
      parts.push_back(R.reshape({-1}));
    }
    parts.push_back(ref[r].buffer.narrow(0, kN1 + kN2, kND));
    comms[r] = at::cat(parts).div_(N);
  }
  at::Tensor comm = comms[0] + comms[1];
  for (int r = 0; r < N; ++r) {
    int64_t pos = 0;
    for (size_t i = 0; i < ref[r].batches.size(); ++i) {
      auto& b = ref[r].batches[i];
      auto n = b.B() * b.rank * b.b();
      st::call0("lorecomm::decompress", {Ps[r][i], comm.narrow(0, pos, n).view({b.B(), b.rank, b.b()}), b.G});
      pos += n;
    }
    ref[r].buffer.narrow(0, kN1 + kN2, kND).copy_(comm.narrow(0, pos, kND));
    EXPECT(at::equal(eng[r].buffer, ref[r].buffer), "k=" << k << " rank " << r << ": bucket differs");
    for (size_t i = 0; i < eng[r].batches.size(); ++i)
      EXPECT(at::equal(eng[r].batches[i].E, ref[r].batches[i].E), "rank " << r << ": E differs");
  }
}

void test_nonfinite_step_is_poisoned() {
  for (const char* which : {"greedy", "lore"}) {
    auto w = std::make_shared<ThreadWorld>(2, 5000ms);
    std::vector<Bucket> bk{make_bucket(0, 1), make_bucket(1, 1)};
    bk[1].buffer[kN1 + kN2 + 3] = std::nan("");  // a dense leftover on rank 1 only
    std::vector<at::Tensor> Q0{bk[0].batches[0].Q.clone(), bk[1].batches[0].Q.clone()};
    on_ranks(2, [&](int r) {
      Engine e(make_pg(w, r));
      std::shared_ptr<Step> s;
      at::Tensor ok;
      if (std::string(which) == "greedy") {
        auto g = greedy_step(bk[r], false, 2);
        ok = g->ok;
        s = g;
      } else {
        auto l = lore_step(bk[r], 2);
        ok = l->ok;
        s = l;
      }
      EXPECT(error_of(e.submit(s)).empty(), which);
      EXPECT(!ok.item<bool>(), which << ": a non-finite step must report ok=false on every rank");
    });
    for (int r = 0; r < 2; ++r) {
      EXPECT(!at::isfinite(bk[r].buffer.narrow(0, 0, kN1 + kN2)).all().item<bool>(), which << ": output not NaN");
      for (auto& b : bk[r].batches) EXPECT(at::equal(b.E, at::zeros_like(b.E)), which << ": E poisoned");
      EXPECT(at::equal(bk[r].batches[0].Q, Q0[r]), which << ": Q changed on a skipped step");
    }
  }
}

// Lore: identical replicas, what it sends, E = H - V R with R rounded to the wire,
// Q = Rbar by decreasing row energy. Exploring at rank r >= 2 replaces the weakest
// tracked direction (r - 1 sketched, r sent); at r = 1 it joins the tracked one (1, 2).
// An error flush with skip_unused: a matrix no rank used keeps its E (DDP drops its output) and
// the step still owes it on every rank (one whose own E for it is zero too: the next step's collectives
// must agree); one unused on a single rank only is flushed as usual.
void test_dense_flush_keeps_unused() {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> bk{make_bucket(0, 1), make_bucket(1, 1)};
  std::vector<at::Tensor> first(N), E0(N);
  for (int r = 0; r < N; ++r) {
    auto g = at::make_generator<at::CPUGeneratorImpl>(50 + r);
    for (auto& b : bk[r].batches) b.E.copy_(at::randn(b.E.sizes(), g, at::kFloat));
    bk[r].batches[0].G.select(0, 0).zero_();       // matrix 0: no rank used it,
    if (r == 1) bk[r].batches[0].E.select(0, 0).zero_();  // and only rank 0 owes for it: owes on both
    if (r == 0) bk[r].batches[1].G.zero_();        // the 4 x 12 matrix: unused on rank 0 only
    E0[r] = bk[r].batches[0].E.select(0, 0).clone();
  }
  at::Tensor mean = at::zeros_like(bk[0].buffer);
  for (int r = 0; r < N; ++r) {
    at::Tensor h = bk[r].buffer.clone();
    for (size_t i = 0; i < bk[r].batches.size(); ++i) {
      const auto& b = bk[r].batches[i];
      at::Tensor v = h.as_strided(b.G.sizes(), b.G.strides(), b.G.storage_offset());
      at::Tensor add = b.E.clone();
      if (i == 0) add.select(0, 0).zero_();
      v.add_(add);
    }
    mean.add_(h.div(N));
  }
  on_ranks(N, [&](int r) {
    Engine e(make_pg(w, r));
    auto s = dense_step(bk[r].buffer);
    s->flush = bk[r].batches;
    s->skip_unused = true;
    EXPECT(error_of(e.submit(s)).empty(), "flush");
    EXPECT(s->ok.item<bool>() && s->owes.item<bool>(), "finite, and matrix 0 still owed");
    EXPECT(s->collectives == 2 && s->bytes_sent == 4 * (2 * 3 + bk[r].buffer.numel()),
           "flags + dense: bytes " << s->bytes_sent << " collectives " << s->collectives);
    const auto& b0 = bk[r].batches[0];
    EXPECT(at::equal(b0.E.select(0, 0), E0[r]), "the unused matrix's E is kept");
    EXPECT(at::count_nonzero(b0.E.select(0, 1)).item<int64_t>() == 0 &&
               at::count_nonzero(bk[r].batches[1].E).item<int64_t>() == 0,
           "the used matrices' E is flushed");
    EXPECT(at::count_nonzero(b0.G.select(0, 0)).item<int64_t>() == 0, "nothing sent for the unused matrix");
    first[r] = bk[r].buffer.clone();
    // used again: the next flush sends what it kept and owes nothing
    b0.G.select(0, 0).fill_(1.0f);
    auto s2 = dense_step(bk[r].buffer);
    s2->flush = bk[r].batches;
    s2->skip_unused = true;
    EXPECT(error_of(e.submit(s2)).empty(), "second flush");
    EXPECT(s2->ok.item<bool>() && !s2->owes.item<bool>(), "nothing owed after it");
    EXPECT(at::count_nonzero(b0.E).item<int64_t>() == 0, "flushed");
  });
  // the second flush sent the kept E: matrix 0 got 1 + mean(E0)
  EXPECT(at::allclose(bk[0].batches[0].G.select(0, 0), (E0[0] + E0[1]).div(N).add(1.0f)), "kept E sent later");
  EXPECT(at::allclose(first[0], mean) && at::equal(first[0], first[1]), "first flush: mean of G + E, used only");
  EXPECT(at::equal(bk[0].buffer, bk[1].buffer), "replicas differ");
}

void test_lore_step(int64_t rank) {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> bk{make_bucket(0, 4, rank), make_bucket(1, 4, rank)};
  std::vector<at::Tensor> H(N);
  for (int r = 0; r < N; ++r) H[r] = bk[r].buffer.clone();
  std::vector<std::map<std::string, int>> ops(N);
  on_ranks(N, [&](int r) {
    auto pg = make_pg(w, r);
    Engine e(pg);
    for (int64_t step = 1; step <= 3; ++step) {
      auto s = lore_step(bk[r], step);
      EXPECT(error_of(e.submit(s)).empty(), "lore step");
      EXPECT(s->ok.item<bool>(), "ok");
      int64_t sketch = 0, fac = 0;
      for (auto& b : bk[r].batches) {
        sketch += b.B() * b.a() * (b.rank > 1 ? b.rank - 1 : 1);
        fac += b.B() * (b.rank > 1 ? b.rank : 2) * b.b();
      }
      EXPECT(s->bytes_sent == 2 * (sketch + fac + kND) && s->collectives == 2, "lore bytes " << s->bytes_sent);
      if (step < 3) bk[r].buffer.copy_(grad(r, 10 + step));
    }
    ops[r] = ops_of(pg);
  });
  EXPECT(at::equal(bk[0].buffer, bk[1].buffer), "replicas differ");
  EXPECT(ops[0]["sum"] == 6 && ops[0].count("max") == 0, "two sum all-reduces per step");
  for (int r = 0; r < N; ++r)
    for (size_t i = 0; i < bk[r].batches.size(); ++i) {
      const auto& Q = bk[r].batches[i].Q;
      EXPECT(at::equal(Q, bk[0].batches[i].Q), "Q differs across ranks");
      auto e = Q.square().sum(-1);
      EXPECT(at::all(e.narrow(-1, 0, e.size(-1) - 1) >= e.narrow(-1, 1, e.size(-1) - 1)).item<bool>(),
             "Q rows not by decreasing energy");
    }
}

// A refresh: mean of G + E, a new basis per batch, E = 0, checksums; a basis that
// differs on one rank is broadcast from rank 0.
void test_refresh(bool perturb) {
  const int N = 2;
  auto w = std::make_shared<ThreadWorld>(N, 5000ms);
  std::vector<Bucket> bk{make_bucket(0, 2), make_bucket(1, 2)};
  for (auto& b : bk)
    for (auto& s : b.batches) s.E.fill_(0.5);
  at::Tensor mean = at::zeros_like(bk[0].buffer);
  for (int r = 0; r < N; ++r) {
    at::Tensor h = bk[r].buffer.clone();
    for (auto& s : bk[r].batches) h.as_strided(s.G.sizes(), s.G.strides(), s.G.storage_offset()).add_(s.E);
    mean.add_(h.div_(N));
  }
  perturb_next_basis = perturb;
  std::vector<std::map<std::string, int>> ops(N);
  std::vector<std::vector<int64_t>> repairs(N);
  on_ranks(N, [&](int r) {
    auto pg = make_pg(w, r);
    Engine e(pg);
    auto s = greedy_step(bk[r], true, 2);
    EXPECT(error_of(e.submit(s)).empty(), "refresh");
    EXPECT(s->ok.item<bool>(), "ok flag");
    repairs[r] = s->repairs;
    ops[r] = ops_of(pg);
  });
  for (int r = 0; r < N; ++r) {
    EXPECT(at::allclose(bk[r].buffer, mean, 1e-6, 1e-6), "rank " << r << ": bucket is not the mean of G + E");
    for (size_t i = 0; i < bk[r].batches.size(); ++i) {
      const auto& s = bk[r].batches[i];
      EXPECT(at::equal(s.E, at::zeros_like(s.E)), "E must be reset");
      EXPECT(at::equal(s.U, bk[0].batches[i].U), "rank " << r << ": basis " << i << " differs from rank 0's");
    }
    const int want = perturb ? 1 : 0;
    EXPECT(repairs[r].size() == 2 && repairs[r][0] + repairs[r][1] == want, "repairs");
    EXPECT(ops[r]["max"] == 1 && ops[r]["sum"] == 1 && ops[r]["bcast"] == want,
           "collectives: sum " << ops[r]["sum"] << " max " << ops[r]["max"] << " bcast " << ops[r]["bcast"]);
  }
}

// Given selections (the fixed / random ablations): no scores, one-float finite flag.
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
    EXPECT(error_of(e.submit(greedy_step(bk[r], false, 3, 0, "fixed"))).empty(), "fixed");
    ops[r] = ops_of(pg);
  });
  for (size_t i = 0; i < bk[0].batches.size(); ++i) {  // fixed: the first r columns of U (= I here)
    const auto& s = bk[0].batches[i];
    at::Tensor P = s.U.narrow(2, 0, 2);
    at::Tensor Rbar = at::zeros({s.B(), 2, s.b()});
    for (int r = 0; r < N; ++r) {
      const auto& G = bk[r].batches[i].G;
      Rbar.add_(at::matmul(P.transpose(-1, -2), in[r].as_strided(G.sizes(), G.strides(), G.storage_offset())) / N);
    }
    EXPECT(at::allclose(s.G, at::matmul(P, Rbar), 1e-5, 1e-5), "batch " << i << " is not P Rbar");
  }
  EXPECT(at::equal(bk[0].buffer, bk[1].buffer), "ranks disagree");
  EXPECT(ops[0]["sum"] == 2 && ops[0].count("max") == 0, "flag + factor all-reduces, no scores");
}

void test_async_and_ordered() {
  auto w = std::make_shared<ThreadWorld>(2, 5000ms);
  w->before_collective = [](int r) {
    if (r == 1) std::this_thread::sleep_for(50ms);
  };
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r));
    e.set_logging(true);
    std::vector<c10::intrusive_ptr<c10::ivalue::Future>> fs;
    const double t0 = Engine::now_s();
    for (int i = 0; i < 4; ++i) fs.push_back(e.submit(dense_step(at::full({16}, float(i)))));
    const double submit_time = Engine::now_s() - t0;
    EXPECT(submit_time < 0.04, "submit blocked for " << submit_time << " s");
    EXPECT(!fs.back()->completed(), "last step finished before the delayed collectives could");
    e.drain();
    EXPECT(e.pending() == 0 && e.steps_done() == 4, "drain");
    for (int i = 0; i < 4; ++i) EXPECT(fs[i]->value().toTensor()[0].item<float>() == float(i), "order");
    auto tl = e.timeline(true);
    EXPECT(tl.size() == 4, "timeline");
    for (size_t i = 1; i < tl.size(); ++i) EXPECT(tl[i].start_s >= tl[i - 1].end_s, "steps overlapped");
    auto log = e.collective_log(true);
    EXPECT(log.size() == 4 && log[0].op == "all_reduce_sum" && log[0].numel == 16 && log[0].what == "dense",
           "collective log");
  });
}

void test_bad_tensor_errors_future() {
  auto w = std::make_shared<ThreadWorld>(1, 1000ms);
  Engine e(make_pg(w, 0));
  Bucket bk = make_bucket(0, 1);
  bk.batches[0].E = at::zeros({3, 3});
  auto s = greedy_step(bk, false, 1);
  s->label = "bucket 7";
  auto msg = error_of(e.submit(s));
  EXPECT(msg.find("bucket 7") != std::string::npos && msg.find("bad input") != std::string::npos &&
             msg.find("E must be float32") != std::string::npos,
         "message: " << msg);
  EXPECT(msg.find("Exception raised from") == std::string::npos, "no C++ backtrace in the message: " << msg);
  // a rejected bucket poisons the engine (its peers' collectives are now out of step) until reset()
  msg = error_of(e.submit(dense_step(at::zeros({4}, at::kInt))));
  EXPECT(msg.find("earlier bucket failed") != std::string::npos && msg.find("reset") != std::string::npos, msg);
  e.reset();
  msg = error_of(e.submit(dense_step(at::zeros({4}, at::kInt))));
  EXPECT(msg.find("dtype must be float32") != std::string::npos, msg);
  e.reset();
  // Lore's step has one mode per coin (0 or 1 random direction), the one the simulation has
  msg = error_of(e.submit(lore_step(make_bucket(0, 1), 1, /*explore=*/2)));
  EXPECT(msg.find("explore must be 0 or 1") != std::string::npos, msg);
}

void test_dead_peer_errors_within_timeout() {
  auto w = std::make_shared<ThreadWorld>(2, 800ms);
  Engine e(make_pg(w, 0));
  const double t0 = Engine::now_s();
  auto s = dense_step(at::ones({8}));
  s->label = "bucket 0";
  auto msg = error_of(e.submit(s));  // rank 1 never joins
  EXPECT(Engine::now_s() - t0 < 3.0, "timeout not respected");
  EXPECT(msg.find("timed out") != std::string::npos && msg.find("all_reduce_sum") != std::string::npos &&
             msg.find("Likely cause") != std::string::npos,
         "message: " << msg);
  msg = error_of(e.submit(dense_step(at::ones({8}))));
  EXPECT(msg.find("earlier bucket failed") != std::string::npos, msg);
  EXPECT(e.failure().has_value(), "failure recorded");
  // a peer that dies mid-wait is reported as such
  auto w2 = std::make_shared<ThreadWorld>(2, 10000ms);
  Engine e2(make_pg(w2, 0));
  auto f2 = e2.submit(dense_step(at::ones({8})));
  std::this_thread::sleep_for(100ms);
  const double t1 = Engine::now_s();
  w2->kill(1);
  msg = error_of(f2);
  EXPECT(msg.find("died") != std::string::npos, msg);
  EXPECT(Engine::now_s() - t1 < 2.0, "dead peer not noticed promptly");
}

void test_mismatched_collectives_named() {
  // ranks that disagree (here: bucket sizes) get a message saying so
  auto w = std::make_shared<ThreadWorld>(2, 2000ms);
  std::vector<std::string> msgs(2);
  on_ranks(2, [&](int r) {
    Engine e(make_pg(w, r));
    msgs[r] = error_of(e.submit(dense_step(at::ones({r == 0 ? 8 : 9}))));
  });
  EXPECT(msgs[0].find("issued different collectives") != std::string::npos ||
             msgs[1].find("issued different collectives") != std::string::npos,
         msgs[0] << " | " << msgs[1]);
}

void test_backend_cannot_move_cpu_tensors() {
  auto w = std::make_shared<ThreadWorld>(1, 1000ms);
  Engine e(make_pg(w, 0, "nccl"));
  auto msg = error_of(e.submit(dense_step(at::ones({8}))));
  EXPECT(msg.find("NCCL cannot communicate cpu tensors") != std::string::npos, "message: " << msg);
  EXPECT(msg.find("died") == std::string::npos, "not a dead peer: " << msg);
}

// a backend whose work never finishes on its own
struct NeverWork : c10d::Work {
  std::chrono::milliseconds cap;
  explicit NeverWork(std::chrono::milliseconds cap) : cap(cap) {}
  bool wait(std::chrono::milliseconds t) override {
    std::this_thread::sleep_for(t.count() ? t : cap);
    throw std::runtime_error("Work timed out after " + std::to_string(t.count() ? t.count() : cap.count()) + " ms");
  }
};
struct Stuck : c10d::Backend {
  std::chrono::milliseconds cap;
  explicit Stuck(std::chrono::milliseconds cap) : c10d::Backend(0, 2), cap(cap) {}
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>&, const c10d::AllreduceOptions&) override {
    return c10::make_intrusive<NeverWork>(cap);
  }
};
c10::intrusive_ptr<c10d::ProcessGroup> stuck_pg(std::chrono::milliseconds cap) {
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(0, 2);
  pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, c10::make_intrusive<Stuck>(cap));
  pg->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
  return pg;
}

void test_engine_timeout_bounds_wait() {
  Engine e(stuck_pg(100000ms), 300ms);
  const double t0 = Engine::now_s();
  auto msg = error_of(e.submit(dense_step(at::ones({4}))));
  EXPECT(msg.find("timed out") != std::string::npos && msg.find("300 ms") != std::string::npos, msg);
  EXPECT(Engine::now_s() - t0 < 2.0, "timeout not respected");
}

void test_shutdown_abandons_a_stuck_worker() {
  // exit must not hang on a worker stuck in a collective: shutdown gives up after its grace
  std::atomic<bool> callback_ran{false};
  c10::intrusive_ptr<c10::ivalue::Future> f;
  {
    Engine e(stuck_pg(1500ms));
    f = e.submit(dense_step(at::ones({4})));
    f->addCallback([&](c10::ivalue::Future&) { callback_ran = true; });
    auto queued = e.submit(dense_step(at::ones({4})));
    std::this_thread::sleep_for(50ms);
    const double t0 = Engine::now_s();
    EXPECT(!e.shutdown(200ms), "shutdown must report the abandoned worker");
    EXPECT(Engine::now_s() - t0 < 1.0, "shutdown waited " << Engine::now_s() - t0 << " s");
    EXPECT(!error_of(queued).empty(), "a queued step fails at shutdown");
    EXPECT(e.shutdown(200ms) == false, "shutdown is idempotent");
  }  // the engine object is gone; its detached worker keeps the core alive
  std::this_thread::sleep_for(1700ms);  // the stuck collective returns now
  EXPECT(!f->completed() && !callback_ran, "an abandoned worker must never complete a future");
}

void test_shutdown_fails_pending() {
  auto w = std::make_shared<ThreadWorld>(2, 2000ms);
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> fs;
  {
    Engine e(make_pg(w, 0));
    for (int i = 0; i < 3; ++i) fs.push_back(e.submit(dense_step(at::ones({4}))));
  }  // destructor: the running one times out, the queued ones fail; nothing hangs
  for (auto& f : fs) EXPECT(!error_of(f).empty(), "pending step must fail at shutdown");
}

void test_shutdown_releases_group() {
  auto w = std::make_shared<ThreadWorld>(1, 2000ms);
  auto pg = make_pg(w, 0);
  for (bool inline_mode : {false, true}) {
    Engine e(pg, 0ms, inline_mode);
    EXPECT(error_of(e.submit(dense_step(at::ones({4})))).empty(), "a step on a 1-rank group must succeed");
    e.drain();
    EXPECT(pg.use_count() == 2, "the engine holds the group while running");
    EXPECT(e.shutdown(), "clean shutdown");
    EXPECT(pg.use_count() == 1, "shutdown must release the group");
    EXPECT(e.world_size() == 1, "world size stays known after shutdown");
    EXPECT(!error_of(e.submit(dense_step(at::ones({4})))).empty(), "submit after shutdown must fail");
  }
}

int main() {
  at::set_num_threads(1);
  struct T {
    const char* name;
    std::function<void()> fn;
  } tests[] = {
      {"dense_mean", [] { test_dense_mean(false); }},
      {"dense_mean_inline", [] { test_dense_mean(true); }},
      {"dense_wire", test_dense_wire},
      {"dense_flush_keeps_unused", test_dense_flush_keeps_unused},
      {"greedy_compressed_paper_matches_reference", [] { test_greedy_compressed_matches_reference(0); }},
      {"greedy_compressed_sketch_matches_reference", [] { test_greedy_compressed_matches_reference(3); }},
      {"nonfinite_step_is_poisoned", test_nonfinite_step_is_poisoned},
      {"lore_step", [] { test_lore_step(3); }},
      {"lore_step_rank1", [] { test_lore_step(1); }},
      {"refresh_matches_reference", [] { test_refresh(false); }},
      {"refresh_repairs_a_differing_basis", [] { test_refresh(true); }},
      {"given_selection", test_given_selection},
      {"async_and_ordered", test_async_and_ordered},
      {"bad_tensor_errors_future", test_bad_tensor_errors_future},
      {"dead_peer_errors_within_timeout", test_dead_peer_errors_within_timeout},
      {"mismatched_collectives_named", test_mismatched_collectives_named},
      {"backend_cannot_move_cpu_tensors", test_backend_cannot_move_cpu_tensors},
      {"engine_timeout_bounds_wait", test_engine_timeout_bounds_wait},
      {"shutdown_abandons_a_stuck_worker", test_shutdown_abandons_a_stuck_worker},
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
