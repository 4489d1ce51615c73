// Classify one image, already preprocessed to raw float32 NCHW (see preprocess.json),
// with this bundle's TensorRT engine (TensorRT 10 C++ API), on the Jetson.
//
//   ./build_engine.sh    # once, on the device: model.onnx -> model.plan
//   g++ -std=c++17 infer_tensorrt.cpp -I/usr/include/aarch64-linux-gnu -I/usr/local/cuda/include \
//       -L/usr/local/cuda/lib64 -lnvinfer -lcudart -o infer_trt
//   ./infer_trt model.plan labels.txt input.f32 3 32 32
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace {
class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << msg << "\n";
  }
};

bool ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess) std::cerr << what << ": " << cudaGetErrorString(status) << "\n";
  return status == cudaSuccess;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: infer_trt model.plan labels.txt input.f32 C H W\n";
    return 2;
  }
  const int c = std::stoi(argv[4]), h = std::stoi(argv[5]), w = std::stoi(argv[6]);
  std::vector<float> input(static_cast<size_t>(c) * h * w);
  std::ifstream raw(argv[3], std::ios::binary);
  if (!raw.read(reinterpret_cast<char*>(input.data()), input.size() * sizeof(float))) {
    std::cerr << "cannot read " << input.size() << " floats from " << argv[3] << "\n";
    return 2;
  }
  std::vector<std::string> labels;
  std::ifstream label_file(argv[2]);
  for (std::string line; std::getline(label_file, line);) labels.push_back(line);

  std::ifstream plan_file(argv[1], std::ios::binary);
  std::vector<char> plan((std::istreambuf_iterator<char>(plan_file)), std::istreambuf_iterator<char>());
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) {
    std::cerr << "cannot load engine " << argv[1] << " (built for another GPU or TensorRT version?)\n";
    return 1;
  }
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  context->setInputShape("input", nvinfer1::Dims4{1, c, h, w});  // dynamic batch axis: run batch 1
  const nvinfer1::Dims out_dims = context->getTensorShape("logits");
  size_t out_count = 1;
  for (int i = 0; i < out_dims.nbDims; ++i) out_count *= static_cast<size_t>(out_dims.d[i]);
  std::vector<float> logits(out_count);

  void* d_in = nullptr;
  void* d_out = nullptr;
  cudaStream_t stream;
  if (!ok(cudaMalloc(&d_in, input.size() * sizeof(float)), "cudaMalloc") ||
      !ok(cudaMalloc(&d_out, logits.size() * sizeof(float)), "cudaMalloc") || !ok(cudaStreamCreate(&stream), "stream"))
    return 1;
  context->setTensorAddress("input", d_in);
  context->setTensorAddress("logits", d_out);
  ok(cudaMemcpyAsync(d_in, input.data(), input.size() * sizeof(float), cudaMemcpyHostToDevice, stream), "copy in");
  if (!context->enqueueV3(stream)) {
    std::cerr << "inference failed\n";
    return 1;
  }
  ok(cudaMemcpyAsync(logits.data(), d_out, logits.size() * sizeof(float), cudaMemcpyDeviceToHost, stream), "copy out");
  ok(cudaStreamSynchronize(stream), "sync");
  cudaFree(d_in);
  cudaFree(d_out);
  cudaStreamDestroy(stream);

  const float top_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float v : logits) sum += std::exp(v - top_logit);
  const size_t top = std::distance(logits.begin(), std::max_element(logits.begin(), logits.end()));
  std::cout << (top < labels.size() ? labels[top] : std::to_string(top)) << "\t" << 1.0 / sum << "\n";
  return 0;
}
