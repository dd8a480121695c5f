/* cowvm SDK: the allocator guest/sdk/src/libc.c provides (a bump allocator). */
#ifndef COWVM_STDLIB_H
#define COWVM_STDLIB_H
#include <stddef.h>
void *malloc(size_t size);
void *calloc(size_t count, size_t size);
void free(void *ptr);
#endif
