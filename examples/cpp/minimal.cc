// The smallest app on an edgekit artifact: load model.so, run one float32 input, print the
// first output.   minimal MODEL.so INPUT.bin 1x3x32x32
// INPUT.bin holds the input's float32 values, little-endian, row-major (numpy: a.tofile()).
// Build: make minimal (links libtvm_runtime and libtvm_ffi from the Python wheels).
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <sstream>
#include <cstdlib>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

// Where the input tensor's bytes live: 64-byte aligned, as TVM's kernels assume (they load
// whole vectors with aligned instructions; with AVX-512 a 16-byte aligned `new float[]` faults).
struct CpuAlloc {
  void AllocData(DLTensor* t) {
    t->data = std::aligned_alloc(64, (ffi::GetDataSize(*t) + 63) / 64 * 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: minimal MODEL.so INPUT.bin DIMS (e.g. 1x3x32x32)\n";
    return 2;
  }
  std::vector<int64_t> shape;
  std::stringstream dims(argv[3]);
  for (std::string d; std::getline(dims, d, 'x');) shape.push_back(std::stoll(d));
  try {
    ffi::Tensor x = ffi::Tensor::FromNDAlloc(CpuAlloc(), ffi::Shape(shape),
                                             DLDataType{kDLFloat, 32, 1}, DLDevice{kDLCPU, 0});
    std::ifstream in(argv[2], std::ios::binary);
    size_t bytes = ffi::GetDataSize(x.numel(), x.dtype());
    if (!in.read(static_cast<char*>(x.data_ptr()), static_cast<std::streamsize>(bytes)) ||
        in.peek() != EOF) {
      std::cerr << "error: " << argv[2] << " must hold exactly " << bytes << " bytes\n";
      return 1;
    }
    // model.so holds a Relax executable: load it into a VM on the CPU (2 = pooled allocator)
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Any result = vm->GetFunction("main").value()(x);
    auto out = result.as<ffi::Tensor>();
    if (!out) out = result.cast<ffi::Array<ffi::Any>>()[0].cast<ffi::Tensor>();
    if (out->dtype() != DLDataType{kDLFloat, 32, 1}) throw std::runtime_error("not float32");
    const float* y = static_cast<const float*>(out->data_ptr());
    for (int64_t i = 0; i < out->numel(); ++i) std::printf("%.6g\n", y[i]);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
