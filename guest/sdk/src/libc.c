/* cowvm SDK: the libc pieces freestanding guest code needs, the bump allocator, and the per-call
   glue crt0 runs. Integer-only, like everything in the guest. */
#include "cowvm.h"

/* One `rep movsb`: KVM emulates a string instruction's iterations without fetching and decoding
   each again, which is far cheaper than a loop when every instruction is emulated. */
void *memcpy(void *dst, const void *src, size_t n) {
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
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
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
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
    if (heap_next != heap_after_init) /* a store would copy the page in every clone */
        heap_next = heap_after_init;
    return status;
}
