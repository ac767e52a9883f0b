// Exact integer arithmetic for input checks: products and sums of int64 sizes that user input can push past int64
// (a wrapped product would let a size check pass, and an error message would print the wrapped value).
#pragma once

#include <cstdint>
#include <string>

namespace dinat_m2f {

using Int128 = __int128;

// Decimal text of an exact 128-bit value (what operator<< lacks for __int128).
inline std::string to_decimal(Int128 value) {
  if (value == 0) {
    return "0";
  }
  const bool negative = value < 0;
  unsigned __int128 magnitude = negative ? -static_cast<unsigned __int128>(value) : value;
  std::string digits;
  while (magnitude > 0) {
    digits.insert(digits.begin(), static_cast<char>('0' + static_cast<int>(magnitude % 10)));
    magnitude /= 10;
  }
  return negative ? "-" + digits : digits;
}

inline Int128 exact_product(int64_t a, int64_t b) { return static_cast<Int128>(a) * static_cast<Int128>(b); }

}  // namespace dinat_m2f
