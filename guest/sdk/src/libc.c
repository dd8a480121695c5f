/* cowvm SDK: the libc pieces freestanding guest code needs, the bump allocator, and the per-call
   glue crt0 runs. Integer-only, like everything in the guest. */
#include "cowvm.h"

void *memcpy(void *dst, const void *src, size_t n) {
    uint8_t *d = dst;
    const uint8_t *s = src;
    while (n >= 8) {
        uint64_t w;
        __builtin_memcpy(&w, s, 8); /* inlined as one mov: no call back into memcpy */
        __builtin_memcpy(d, &w, 8);
        d += 8, s += 8, n -= 8;
    }
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n) {
    uint8_t *d = dst;
    const uint8_t *s = src;
    if (d <= s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    uint8_t *d = dst;
    uint64_t w = (uint8_t)c * 0x0101010101010101ULL;
    while (n >= 8) {
        __builtin_memcpy(d, &w, 8);
        d += 8, n -= 8;
    }
    while (n--)
        *d++ = (uint8_t)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n) {
    const uint8_t *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

size_t strlen(const char *s) {
    const char *p = s;
    while (*p)
        p++;
    return (size_t)(p - s);
}

void cowvm_puts(const char *s) { cowvm_log(s, strlen(s)); }

/* The heap: [__heap_start, __heap_end) from the linker script. */
extern uint8_t __heap_start[], __heap_end[];
static uintptr_t heap_next;      /* 0 until first use */
static uintptr_t heap_after_init;

void *malloc(size_t size) {
    if (!heap_next)
        heap_next = (uintptr_t)__heap_start;
    uintptr_t start = (heap_next + 15) & ~(uintptr_t)15;
    if (size > (uintptr_t)__heap_end - start)
        return 0;
    heap_next = start + size;
    return (void *)start;
}

void *calloc(size_t count, size_t size) {
    if (size && count > (size_t)-1 / size)
        return 0;
    void *p = malloc(count * size);
    if (p)
        memset(p, 0, count * size);
    return p;
}

void free(void *ptr) { (void)ptr; }

__attribute__((weak)) int cowvm_init(void) { return 0; }

/* Called by crt0 once cowvm_init has returned: the heap as it is now is what every call starts
   from. */
void cowvm__after_init(void) { heap_after_init = heap_next; }

/* One call: run cowvm_main on the mailbox, publish the output length, release the call's heap. */
uint32_t cowvm__call_once(void) {
    volatile struct cowvm_mailbox *box = COWVM_HEADER;
    size_t out_len = 0;
    uint64_t in_len = box->input_len;
    if (in_len > COWVM_MAILBOX_INPUT_SIZE)
        in_len = 0;
    uint32_t status = cowvm_main((const uint8_t *)COWVM_MAILBOX_INPUT, in_len,
                                 (uint8_t *)COWVM_MAILBOX_OUTPUT, COWVM_MAILBOX_OUTPUT_SIZE, &out_len);
    box->output_len = out_len;
    heap_next = heap_after_init;
    return status;
}
