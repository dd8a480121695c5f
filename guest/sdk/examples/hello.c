/* The smallest useful cowvm guest: logs once at start-up, then answers every call with
   "hello, " followed by its input. Build: guest/sdk/cowvm-cc -o hello.elf hello.c */
#include <cowvm.h>

static const char greeting[] = "hello, ";

int cowvm_init(void) {
    cowvm_puts("hello guest initialised");
    return 0;
}

uint32_t cowvm_main(const uint8_t *input, size_t input_len, uint8_t *output, size_t output_cap,
                    size_t *output_len) {
    size_t n = sizeof greeting - 1;
    if (n + input_len > output_cap)
        return 1;
    memcpy(output, greeting, n);
    memcpy(output + n, input, input_len);
    *output_len = n + input_len;
    return 0;
}
