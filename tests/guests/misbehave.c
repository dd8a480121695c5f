/* A guest for the error paths of `call`: what it does depends on its input.
     "fault"    executes ud2 (#UD, an exception)
     "spin"     loops forever
     "badptr"   passes log() a pointer outside guest RAM
     "big"      reports more output than the mailbox holds
     "abort"    calls abort(7)
     "badcall"  makes a hypercall with an unknown number
     "identity" answers its generation id and seed (16 bytes, little-endian)
     "count"    answers how many calls this VM has served (8 bytes; state kept in .bss)
     "log"      logs three lines and answers "logged"
   anything else is echoed back with status = its length. */
#include <cowvm.h>

static uint64_t calls;

static int is(const uint8_t *input, size_t len, const char *word) {
    size_t n = strlen(word);
    return len == n && memcmp(input, word, n) == 0;
}

uint32_t cowvm_main(const uint8_t *input, size_t input_len, uint8_t *output, size_t output_cap,
                    size_t *output_len) {
    calls++;
    if (is(input, input_len, "fault"))
        __builtin_trap();
    if (is(input, input_len, "spin"))
        for (;;)
            __asm__ volatile("");
    if (is(input, input_len, "badptr"))
        cowvm_log((const void *)0x7fffffff0000UL, 16);
    if (is(input, input_len, "big")) {
        *output_len = output_cap + 1;
        return 0;
    }
    if (is(input, input_len, "abort")) {
        cowvm_puts("giving up");
        cowvm_abort(7);
    }
    if (is(input, input_len, "badcall"))
        __asm__ volatile("out %0, %1" ::"a"(99), "Nd"((uint16_t)COWVM_PORT_HYPERCALL) : "memory");
    if (is(input, input_len, "identity")) {
        uint64_t id[2] = {cowvm_generation(), cowvm_seed()};
        memcpy(output, id, sizeof id);
        *output_len = sizeof id;
        return 0;
    }
    if (is(input, input_len, "count")) {
        memcpy(output, &calls, sizeof calls);
        *output_len = sizeof calls;
        return 0;
    }
    if (is(input, input_len, "log")) {
        cowvm_puts("one\n");
        cowvm_puts("two\n");
        cowvm_puts("three\n");
        memcpy(output, "logged", 6);
        *output_len = 6;
        return 0;
    }
    if (input_len > output_cap)
        return 1;
    memcpy(output, input, input_len);
    *output_len = input_len;
    return (uint32_t)input_len;
}
