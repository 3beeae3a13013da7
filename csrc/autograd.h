// The autograd of the operators (autograd.cpp), as the module's entry points use it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "torch_compat.h"


namespace gfl::autograd {

// A registered gfl_ops operator, typed; callers keep it in a function-local static.
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A tensor that no vmap (functorch's, or the legacy one behind
// autograd.grad(is_grads_batched=True)), tensor subclass, fake or functional wrapper wraps: an
// ordinary eager tensor, whose memory the nodes may write in place.
bool is_plain(const at::Tensor& t);

// The reduced loss sum_i l_i * weight_i * unit (0-d) of qfl (kind 0: target = labels, scores
// given), qfl_dense (1) or dfl (2), fused gradient folded into the forward (see autograd.cpp).
at::Tensor reduced_loss(const at::Tensor& pred, const at::Tensor& target,
                        const gfl::optional<at::Tensor>& scores,
                        const gfl::optional<at::Tensor>& weight, double unit, int64_t kind,
                        double beta, bool activated);

}  // namespace gfl::autograd
