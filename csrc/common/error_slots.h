// Slots of the per-device error buffer the CUDA kernels record value errors in (see
// cuda/launchers.h); mtlue::take_pending_errors returns them as an int64 [kSlots] tensor (all
// zero on the CPU, whose kernels raise at once). mtlue_fast/ops/_errors.py reads them by the same
// numbers.
#pragma once

namespace mtlue {

// A *Count slot is incremented atomically; the thread that moved it from 0 fills the slots after
// it with a description of the first violation seen.
namespace error_slot {
constexpr int kCropCount = 0;   // crop windows found outside the image (and clamped into it)
constexpr int kCropSample = 1;  // first one: sample index, top, left, window h, w, image H, W
constexpr int kCropTop = 2;
constexpr int kCropLeft = 3;
constexpr int kCropHeight = 4;
constexpr int kCropWidth = 5;
constexpr int kImageHeight = 6;
constexpr int kImageWidth = 7;
constexpr int kExportOverflow = 8;  // quantize_export elements with |protected - x| > 127
constexpr int kOffsetsCount = 9;    // embedding_reg task_offsets violations
constexpr int kOffsetsIndex = 10;   // first one: k (-1: end points), offsets[k], offsets[k+1], R
constexpr int kOffsetsLow = 11;
constexpr int kOffsetsHigh = 12;
constexpr int kOffsetsRows = 13;
constexpr int kSlots = 16;
}  // namespace error_slot

}  // namespace mtlue
