// The library's entry point: onnxruntime's RegisterCustomOps adds the gemma4_ort domain (ops/moe/body.py
// KERNEL_DOMAIN) with every kernel of this folder to a session's options.

#include <memory>
#include <mutex>

#include "kernels.h"

namespace {

const char* kDomain = "gemma4_ort";

template <typename Op>
Ort::Custom::OrtLiteCustomOp* Cpu(const char* name) {
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
      Ort::Custom::CreateLiteCustomOp<Op>(name, "CPUExecutionProvider")};
  return op.get();
}

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // one domain for every session of the process (sessions may register from several threads)
  static Ort::CustomOpDomain domain{kDomain};
  static std::once_flag added;
  try {
    std::call_once(added, [] {
      domain.Add(Cpu<gemma4_ort::MoEStep>("MoEStep"));
      domain.Add(Cpu<gemma4_ort::MoENBits>("MoENBits"));
      domain.Add(Cpu<gemma4_ort::SlidingWindowAttention>("SlidingWindowAttention"));
      domain.Add(Cpu<gemma4_ort::NormRopeAttention>("NormRopeAttention"));
    });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
