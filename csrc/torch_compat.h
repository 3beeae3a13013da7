// What differs between the torch releases gfl-ops compiles against (2.1 .. the newest).
//
// Why: most mmdetection 3.x installs run torch 2.0 / 2.1, the newest releases mmcv 2.1's
// prebuilt wheels exist for, while the project itself pins a current torch.  The C++ that
// changed between them is small and lives here, so the rest of csrc/ reads as current torch:
// - c10::optional was its own class before torch 2.2 (an alias of std::optional since), and
//   operator signatures must use the type the dispatcher boxes;
// - c10::Allocator::allocate became non-const in torch 2.3, which also added copy_data.
#pragma once

#include <c10/util/Optional.h>
#include <torch/version.h>

#define GFL_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||      \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace gfl {

#if GFL_TORCH_AT_LEAST(2, 2)
template <class T>
using optional = std::optional<T>;
inline constexpr std::nullopt_t nullopt = std::nullopt;
#else
template <class T>
using optional = c10::optional<T>;
inline constexpr c10::nullopt_t nullopt = c10::nullopt;
#endif

}  // namespace gfl
