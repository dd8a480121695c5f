/*
 * cowvm guest ABI v1 (docs/guest-abi.md): what a guest program sees.
 *
 * The VMM enters the program in 64-bit long mode at ring 0, identity mapped. crt0 switches to the
 * SDK's stack, calls cowvm_init(), then cowvm_ready() (the template point: clones start here),
 * then for every call: cowvm_main() on the mailbox's input, cowvm_done(status).
 *
 * Build with guest/sdk/cowvm-cc: freestanding, integer-only (-mgeneral-regs-only), static.
 */
#ifndef COWVM_H
#define COWVM_H

#include <stddef.h>
#include <stdint.h>

/* ABI version the VMM writes into the mailbox header. */
#define COWVM_ABI_VERSION 1

/* Hypercalls: `out COWVM_PORT_HYPERCALL, eax` with eax = number, rdi / rsi = arguments. */
#define COWVM_PORT_HYPERCALL 0xf2
#define COWVM_HC_LOG 1
#define COWVM_HC_READY 2
#define COWVM_HC_DONE 3
#define COWVM_HC_ABORT 4

/* Most bytes one log() may pass. */
#define COWVM_LOG_MAX 4096

/* The mailbox: a fixed guest-physical range below the program (1 MiB). */
#define COWVM_MAILBOX 0x80000UL
#define COWVM_MAILBOX_INPUT 0x80040UL
#define COWVM_MAILBOX_INPUT_SIZE 0x3ffc0UL
#define COWVM_MAILBOX_OUTPUT 0xc0000UL
#define COWVM_MAILBOX_OUTPUT_SIZE 0x40000UL

/* The mailbox header. The VMM writes every field except output_len before each call. */
struct cowvm_mailbox {
    uint64_t abi_version; /* COWVM_ABI_VERSION */
    uint64_t input_len;   /* bytes of input at COWVM_MAILBOX_INPUT */
    uint64_t output_len;  /* written by the guest before done(): bytes at COWVM_MAILBOX_OUTPUT */
    uint64_t generation;  /* this clone's generation id (unique per clone start) */
    uint64_t seed;        /* this clone's random seed (from the host's OS RNG) */
    uint64_t reserved[3];
};

#define COWVM_HEADER ((volatile struct cowvm_mailbox *)COWVM_MAILBOX)

/* Hypercalls (guest/sdk/src/crt0.S). */
void cowvm_log(const void *ptr, size_t len);
void cowvm_ready(void);
void cowvm_done(uint32_t status);
__attribute__((noreturn)) void cowvm_abort(uint32_t code);

/* Logs a NUL-terminated string. */
void cowvm_puts(const char *s);

/* The identity of the clone running this call (0 in a VM that was never cloned). */
static inline uint64_t cowvm_generation(void) { return COWVM_HEADER->generation; }
static inline uint64_t cowvm_seed(void) { return COWVM_HEADER->seed; }

/*
 * What the program provides. cowvm_init runs once, before ready() (default: nothing); a non-zero
 * return aborts with that code. cowvm_main runs once per call: it reads input_len bytes, writes
 * at most output_cap bytes to output, sets *output_len and returns the call's status.
 */
int cowvm_init(void);
uint32_t cowvm_main(const uint8_t *input, size_t input_len, uint8_t *output, size_t output_cap,
                    size_t *output_len);

/* The few libc pieces freestanding code needs (guest/sdk/src/libc.c). */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/*
 * A bump allocator over the heap the linker script reserves (COWVM_HEAP_SIZE, default 4 MiB).
 * free() does nothing; memory allocated during a call is released when the call returns, memory
 * allocated in cowvm_init() lives on in every clone.
 */
void *malloc(size_t size);
void *calloc(size_t count, size_t size);
void free(void *ptr);

#endif
