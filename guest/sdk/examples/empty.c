/* The cheapest call: no input read, no output. `cowvm bench call` measures the VMM and the SDK's
   own path with it. Build: guest/sdk/cowvm-cc -o empty.elf empty.c */
#include <cowvm.h>

uint32_t cowvm_main(const uint8_t *input, size_t input_len, uint8_t *output, size_t output_cap,
                    size_t *output_len) {
    (void)input, (void)input_len, (void)output, (void)output_cap;
    *output_len = 0;
    return 0;
}
