// Classify one image, already preprocessed to raw float32 NCHW (see preprocess.json),
// with this bundle's model.onnx in ONNX Runtime's C++ API.
//
//   g++ -std=c++17 infer_onnxruntime.cpp -I$ORT/include -L$ORT/lib -lonnxruntime -o infer
//   python -c "..." > input.f32   # or your own preprocessing, per preprocess.json
//   ./infer model.onnx labels.txt input.f32 3 32 32 [THREADS]
//
// THREADS: the "threads" of runtime.json, the inference threads the latency was measured on (omit it where that is
// null: ONNX Runtime's own choice).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 7 && argc != 8) {
    std::cerr << "usage: infer model.onnx labels.txt input.f32 C H W [THREADS]\n";
    return 2;
  }
  const int64_t c = std::stoll(argv[4]), h = std::stoll(argv[5]), w = std::stoll(argv[6]);
  std::vector<float> input(c * h * w);
  std::ifstream raw(argv[3], std::ios::binary);
  if (!raw.read(reinterpret_cast<char*>(input.data()), input.size() * sizeof(float))) {
    std::cerr << "cannot read " << c * h * w << " floats from " << argv[3] << "\n";
    return 2;
  }
  std::vector<std::string> labels;
  std::ifstream label_file(argv[2]);
  for (std::string line; std::getline(label_file, line);) labels.push_back(line);

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "edgecompress");
  Ort::SessionOptions options;
  if (argc == 8) options.SetIntraOpNumThreads(std::stoi(argv[7]));
  Ort::Session session(env, argv[1], options);
  std::array<int64_t, 4> shape{1, c, h, w};
  auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value tensor = Ort::Value::CreateTensor<float>(memory, input.data(), input.size(), shape.data(), shape.size());
  const char* input_names[] = {"input"};
  const char* output_names[] = {"logits"};
  auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &tensor, 1, output_names, 1);
  const float* logits = outputs[0].GetTensorData<float>();
  const size_t n = outputs[0].GetTensorTypeAndShapeInfo().GetElementCount();
  const size_t top = std::max_element(logits, logits + n) - logits;
  std::cout << (top < labels.size() ? labels[top] : std::to_string(top)) << "\t" << logits[top] << "\n";
  return 0;
}
