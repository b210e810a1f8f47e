// edgekit-runner: load an edgekit artifact's model.so with the TVM runtime, run it on inputs
// read from .npy files, and print the outputs and latency statistics as one JSON object.
//
// It is the on-device benchmark binary (like TFLite's benchmark_model) and the C++ embedding
// example. It uses only the tvm_ffi headers that the apache-tvm-ffi wheel ships, and links
// libtvm_runtime (whose loaders read the Relax executable) and libtvm_ffi.
//
//   edgekit-runner MODEL.so [--warmup N] [--repeat N] [--duration S] [--threads N]
//                  [--out DIR] [--shape I=1xseq ...] [--dim seq=LO..HI ...]
//                  IN0.npy [IN1.npy ...]
//
// Inputs are given in the model's input order; each .npy header gives its shape, so the
// files define a symbolic model's length. --shape declares input I's shape from the
// manifest (numbers and dim names) and --dim bounds a name: before anything runs, every
// declared input's rank, fixed dims and lengths are checked and inputs sharing a name must
// share its length (the Relax VM checks ranks and fixed dims, not the bounds, and its memory
// is planned for the upper bounds). edgekit's runner.py passes both from the manifest.
// With --out, output i is written to DIR/output_i.npy; without it the output values are
// printed in the JSON.
// Statistics follow edgekit.profile.stats (numpy's linear percentiles, std with ddof=1).
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

using Clock = std::chrono::steady_clock;

struct HostAlloc {  // 64-byte aligned CPU buffers for input tensors
  void AllocData(DLTensor* t) {
    size_t bytes = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (t->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct DType {
  const char* npy;  // numpy descr without the byte-order character
  const char* name;
  DLDataType dl;
};

const DType kTypes[] = {
    {"f4", "float32", {kDLFloat, 32, 1}}, {"f8", "float64", {kDLFloat, 64, 1}},
    {"f2", "float16", {kDLFloat, 16, 1}}, {"i1", "int8", {kDLInt, 8, 1}},
    {"i2", "int16", {kDLInt, 16, 1}},     {"i4", "int32", {kDLInt, 32, 1}},
    {"i8", "int64", {kDLInt, 64, 1}},     {"u1", "uint8", {kDLUInt, 8, 1}},
    {"u2", "uint16", {kDLUInt, 16, 1}},   {"u4", "uint32", {kDLUInt, 32, 1}},
    {"u8", "uint64", {kDLUInt, 64, 1}},   {"b1", "bool", {kDLBool, 8, 1}},
};

const DType& FromNpy(const std::string& descr) {
  // Little-endian ('<') or byte-order-free ('|') only: the targets are little-endian.
  if (descr.size() == 3 && (descr[0] == '<' || descr[0] == '|')) {
    for (const DType& t : kTypes) {
      if (descr.compare(1, 2, t.npy) == 0) return t;
    }
  }
  throw std::runtime_error("unsupported .npy dtype '" + descr + "'");
}

const DType& FromDL(DLDataType dl) {
  for (const DType& t : kTypes) {
    if (t.dl.code == dl.code && t.dl.bits == dl.bits && t.dl.lanes == dl.lanes) return t;
  }
  throw std::runtime_error("output has an unsupported dtype");
}

std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header has no '" + key + "'");
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  size_t end = header[at] == '(' ? header.find(')', at) + 1
             : header[at] == '\'' ? header.find('\'', at + 1) + 1
                                  : header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open input " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw std::runtime_error(path + " is not a .npy file");
  }
  uint32_t header_len = 0;
  unsigned char len_bytes[4] = {0, 0, 0, 0};
  in.read(reinterpret_cast<char*>(len_bytes), magic[6] == 1 ? 2 : 4);
  header_len = len_bytes[0] | len_bytes[1] << 8 | len_bytes[2] << 16 | len_bytes[3] << 24;
  std::string header(header_len, ' ');
  in.read(header.data(), header_len);
  std::string descr = HeaderValue(header, "descr");
  if (HeaderValue(header, "fortran_order") != "False") {
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  }
  std::vector<int64_t> shape;
  std::string dims = HeaderValue(header, "shape");
  for (size_t i = 1; i < dims.size();) {
    size_t j = dims.find_first_of(",)", i);
    std::string tok = dims.substr(i, j - i);
    if (tok.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(tok));
    i = j + 1;
  }
  const DType& t = FromNpy(descr.substr(1, descr.size() - 2));
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           t.dl, DLDevice{kDLCPU, 0});
  size_t bytes = ffi::GetDataSize(x.numel(), t.dl);
  in.read(static_cast<char*>(x.data_ptr()), static_cast<std::streamsize>(bytes));
  if (!in) throw std::runtime_error(path + ": file is shorter than its header says");
  return x;
}

struct Bounds {
  int64_t lo, hi;
};

// "1xseq" -> {"1", "seq"}; "seq=1..256" -> ("seq", {1, 256}).
std::vector<std::string> SplitDims(const std::string& text) {
  std::vector<std::string> out;
  for (size_t i = 0; i <= text.size();) {
    size_t j = text.find('x', i);
    if (j == std::string::npos) j = text.size();
    out.push_back(text.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

std::pair<std::string, Bounds> ParseDim(const std::string& text) {
  size_t eq = text.find('='), dots = text.find("..");
  if (eq == std::string::npos || dots == std::string::npos || dots < eq) {
    throw std::invalid_argument("--dim " + text);
  }
  Bounds b{std::stoll(text.substr(eq + 1, dots - eq - 1)), std::stoll(text.substr(dots + 2))};
  if (b.lo < 1 || b.lo > b.hi) throw std::invalid_argument("--dim " + text);
  return {text.substr(0, eq), b};
}

// Each declared input's shape against its array: rank, fixed dims, a name's bounds and one
// length per name (the messages of edgekit.shapes.bind, inputs by position).
void CheckShapes(const std::vector<ffi::Tensor>& inputs,
                 const std::map<size_t, std::vector<std::string>>& declared,
                 const std::map<std::string, Bounds>& bounds) {
  std::map<std::string, int64_t> values;
  for (const auto& [index, dims] : declared) {
    std::string where = "input " + std::to_string(index);
    if (index >= inputs.size()) throw std::runtime_error("--shape for missing " + where);
    const ffi::Tensor& t = inputs[index];
    if (t.ndim() != static_cast<int>(dims.size())) {
      throw std::runtime_error(where + " has rank " + std::to_string(t.ndim()) +
                               ", the model expects rank " + std::to_string(dims.size()));
    }
    for (size_t axis = 0; axis < dims.size(); ++axis) {
      const std::string& want = dims[axis];
      int64_t have = t.shape()[axis];
      std::string at = " (axis " + std::to_string(axis) + ")";
      if (!want.empty() && std::isdigit(static_cast<unsigned char>(want[0]))) {
        if (std::stoll(want) != have) {
          throw std::runtime_error(where + " is " + std::to_string(have) + " long" + at +
                                   ", the model expects " + want);
        }
        continue;
      }
      auto b = bounds.find(want);
      if (b == bounds.end()) throw std::runtime_error("dim '" + want + "' has no --dim bounds");
      if (have < b->second.lo || have > b->second.hi) {
        throw std::runtime_error(where + ": dim '" + want + "'" + at + " is " +
                                 std::to_string(have) + ", outside its bounds " +
                                 std::to_string(b->second.lo) + ".." +
                                 std::to_string(b->second.hi));
      }
      auto [seen, fresh] = values.emplace(want, have);
      if (!fresh && seen->second != have) {
        throw std::runtime_error("dim '" + want + "' is " + std::to_string(seen->second) +
                                 " in one input and " + std::to_string(have) + " in " + where +
                                 ": inputs that share a dim name share its length");
      }
    }
  }
}

std::string ShapeJson(const ffi::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.ndim(); ++i) os << (i ? ", " : "") << t.shape()[i];
  os << "]";
  return os.str();
}

void WriteNpy(const ffi::Tensor& t, const std::string& path) {
  std::string shape = "(";
  for (int i = 0; i < t.ndim(); ++i) shape += std::to_string(t.shape()[i]) + ", ";
  if (t.ndim() > 1) shape.resize(shape.size() - 2);
  shape += ")";
  const DType& d = FromDL(t.dtype());
  char order = t.dtype().bits == 8 ? '|' : '<';
  std::string header = std::string("{'descr': '") + order + d.npy +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // pad so data starts 64-aligned
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.put(static_cast<char>(len & 0xff)).put(static_cast<char>(len >> 8));
  out << header;
  out.write(static_cast<const char*>(t.data_ptr()),
            static_cast<std::streamsize>(ffi::GetDataSize(t.numel(), t.dtype())));
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string ValuesJson(const ffi::Tensor& t) {
  std::ostringstream os;
  os << std::setprecision(9) << "[";
  const DType& d = FromDL(t.dtype());
  for (int64_t i = 0; i < t.numel(); ++i) {
    os << (i ? ", " : "");
    std::string n = d.name;
    const char* p = static_cast<const char*>(t.data_ptr());
    if (n == "float32") os << reinterpret_cast<const float*>(p)[i];
    else if (n == "float64") os << std::setprecision(17) << reinterpret_cast<const double*>(p)[i];
    else if (n == "int32") os << reinterpret_cast<const int32_t*>(p)[i];
    else if (n == "int64") os << reinterpret_cast<const int64_t*>(p)[i];
    else if (n == "int8") os << int{reinterpret_cast<const int8_t*>(p)[i]};
    else if (n == "uint8" || n == "bool") os << int{reinterpret_cast<const uint8_t*>(p)[i]};
    else throw std::runtime_error(n + " outputs need --out");
  }
  os << "]";
  return os.str();
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *arr) Flatten(v, out);
  } else {
    throw std::runtime_error("main returned something that is not a tensor or a tuple");
  }
}

double Percentile(const std::vector<double>& sorted, double q) {  // numpy "linear"
  double pos = q / 100.0 * static_cast<double>(sorted.size() - 1);
  size_t lo = static_cast<size_t>(std::floor(pos));
  size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

std::string StatsJson(const std::vector<double>& times) {
  std::vector<double> s(times);
  std::sort(s.begin(), s.end());
  double mean = 0, var = 0;
  for (double t : s) mean += t / static_cast<double>(s.size());
  for (double t : s) var += (t - mean) * (t - mean);
  double std = s.size() > 1 ? std::sqrt(var / static_cast<double>(s.size() - 1)) : 0.0;
  std::ostringstream os;
  os << std::setprecision(9) << "{\"min\": " << s.front() << ", \"mean\": " << mean
     << ", \"median\": " << Percentile(s, 50) << ", \"p90\": " << Percentile(s, 90)
     << ", \"p95\": " << Percentile(s, 95) << ", \"p99\": " << Percentile(s, 99)
     << ", \"max\": " << s.back() << ", \"std\": " << std
     << ", \"cv\": " << (mean > 0 ? std / mean : 0.0) << "}";
  return os.str();
}

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += (c == '\n' || c == '\t') ? ' ' : c;
  }
  return out;
}

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

const char kUsage[] =
    "usage: edgekit-runner MODEL.so [--warmup N] [--repeat N] [--duration S] [--threads N]\n"
    "                      [--out DIR] [--shape I=1xseq ...] [--dim seq=LO..HI ...]\n"
    "                      IN0.npy [IN1.npy ...]\n"
    "Load an edgekit artifact's model.so, run it on the .npy inputs (in the model's input\n"
    "order) and print the outputs and latency statistics (ms) as one JSON object.\n"
    "  --warmup N      untimed runs first (default 10)\n"
    "  --repeat N      timed runs (default 100)\n"
    "  --duration S    time runs for S seconds instead of --repeat\n"
    "  --threads N     runtime worker threads (TVM_NUM_THREADS)\n"
    "  --out DIR       write output i to DIR/output_i.npy instead of printing values\n"
    "  --shape I=DIMS  input I's declared shape, names for symbolic dims (1xseq)\n"
    "  --dim N=LO..HI  bounds of symbolic dim N: inputs outside them are refused\n";

int Usage() {
  std::cerr << kUsage;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  if (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << kUsage;
    return 0;
  }
  std::string model = argv[1], out_dir;
  long warmup = 10, repeat = 100;
  double duration = 0;
  std::vector<std::string> input_paths;
  std::map<size_t, std::vector<std::string>> declared;  // --shape: input index -> dims
  std::map<std::string, Bounds> bounds;                  // --dim
  try {
    for (int i = 2; i < argc; ++i) {
      std::string a = argv[i];
      bool has_value = i + 1 < argc;
      if (a == "--warmup" && has_value) warmup = std::stol(argv[++i]);
      else if (a == "--repeat" && has_value) repeat = std::stol(argv[++i]);
      else if (a == "--duration" && has_value) duration = std::stod(argv[++i]);
      else if (a == "--threads" && has_value) setenv("TVM_NUM_THREADS", argv[++i], 1);
      else if (a == "--out" && has_value) out_dir = argv[++i];
      else if (a == "--shape" && has_value) {
        std::string spec = argv[++i];
        size_t eq = spec.find('=');
        if (eq == std::string::npos) return Usage();
        declared[std::stoul(spec.substr(0, eq))] = SplitDims(spec.substr(eq + 1));
      } else if (a == "--dim" && has_value) bounds.insert(ParseDim(argv[++i]));
      else if (a.rfind("--", 0) == 0) return Usage();
      else input_paths.push_back(a);
    }
  } catch (const std::exception&) {
    return Usage();
  }
  if (warmup < 0 || repeat < 1 || duration < 0) return Usage();
  try {
    std::vector<ffi::Tensor> tensors;
    for (const std::string& p : input_paths) tensors.push_back(ReadNpy(p));
    CheckShapes(tensors, declared, bounds);
    std::vector<ffi::Any> args(tensors.begin(), tensors.end());

    auto t0 = Clock::now();
    ffi::Module lib = ffi::Module::LoadFromFile(model);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // device type, device id, allocator (2 = pooled), as the Python VirtualMachine does
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function main_fn = vm->GetFunction("main").value();
    auto t1 = Clock::now();

    std::vector<ffi::AnyView> views(args.begin(), args.end());
    auto call = [&]() {
      ffi::Any result;
      main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
      return result;
    };
    ffi::Any first = call();
    auto t2 = Clock::now();
    std::vector<ffi::Tensor> outputs;
    Flatten(first, &outputs);

    for (long i = 0; i < warmup; ++i) call();
    std::vector<double> times;
    auto deadline = Clock::now() + std::chrono::duration<double>(duration);
    while (duration > 0 ? Clock::now() < deadline : static_cast<long>(times.size()) < repeat) {
      auto a = Clock::now();
      call();
      times.push_back(Ms(a, Clock::now()));
    }
    if (times.empty()) throw std::runtime_error("no timed run completed");

    int threads = 0;  // the runtime's worker threads (TVM_NUM_THREADS or the CPU count)
    if (auto num_threads = ffi::Function::GetGlobal("runtime.NumThreads")) {
      threads = (*num_threads)().cast<int>();
    }
    std::ostringstream js;
    js << std::setprecision(9) << "{\"runner\": \"edgekit-runner\", \"model\": \""
       << Escape(model) << "\", \"threads\": " << threads << ", \"load_ms\": " << Ms(t0, t1) << ", \"first_run_ms\": " << Ms(t1, t2)
       << ", \"iterations\": " << times.size() << ", \"latency_ms\": " << StatsJson(times)
       << ", \"times_ms\": [";
    for (size_t i = 0; i < times.size(); ++i) js << (i ? ", " : "") << times[i];
    js << "], \"outputs\": [";
    for (size_t i = 0; i < outputs.size(); ++i) {
      const ffi::Tensor& t = outputs[i];
      js << (i ? ", " : "") << "{\"index\": " << i << ", \"dtype\": \"" << FromDL(t.dtype()).name
         << "\", \"shape\": " << ShapeJson(t);
      if (!out_dir.empty()) {
        std::string path = out_dir + "/output_" + std::to_string(i) + ".npy";
        WriteNpy(t, path);
        js << ", \"file\": \"" << Escape(path) << "\"}";
      } else {
        js << ", \"values\": " << ValuesJson(t) << "}";
      }
    }
    js << "]}";
    std::cout << js.str() << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::cerr << "error: " << msg.substr(0, msg.find('\n')) << std::endl;
    return 1;
  }
}
