/* A guest around real code nobody here wrote: zlib's inflate, built from the sources the
   libz-sys crate ships (tests/build.rs). cowvm_init sets up the stream and inflates a built-in
   self-test stream before ready(), so the state and the 32 KiB window are allocated in the
   template; each call resets the stream and inflates its input (zlib format) into the output. */
#include <cowvm.h>
#include "zlib.h"

static z_stream stream;

/* zlib's "cowvm guest zlib self-test", compressed on the host with zlib at level 9. */
static const unsigned char self_test[] = {
    0x78, 0xda, 0x4b, 0xce, 0x2f, 0x2f, 0xcb, 0x55, 0x48, 0x2f, 0x4d, 0x2d, 0x2e, 0x51, 0xa8, 0xca,
    0xc9, 0x4c, 0x52, 0x28, 0x4e, 0xcd, 0x49, 0xd3, 0x2d, 0x01, 0x72, 0x01, 0x87, 0xa6, 0x09, 0xfd};
static const char self_test_plain[] = "cowvm guest zlib self-test";

static voidpf zalloc(voidpf opaque, uInt items, uInt size) {
    (void)opaque;
    return malloc((size_t)items * size);
}

static void zfree(voidpf opaque, voidpf ptr) {
    (void)opaque;
    free(ptr);
}

int cowvm_init(void) {
    unsigned char plain[64];
    stream.zalloc = zalloc;
    stream.zfree = zfree;
    if (inflateInit(&stream) != Z_OK)
        return 1;
    stream.next_in = (Bytef *)self_test;
    stream.avail_in = sizeof self_test;
    stream.next_out = plain;
    stream.avail_out = sizeof plain;
    /* Z_NO_FLUSH makes inflate keep a window, so it is allocated now and never during a call. */
    if (inflate(&stream, Z_NO_FLUSH) != Z_STREAM_END)
        return 2;
    if (stream.total_out != sizeof self_test_plain - 1 ||
        memcmp(plain, self_test_plain, stream.total_out) != 0)
        return 3;
    cowvm_puts("zlib ");
    cowvm_puts(zlibVersion());
    cowvm_puts(" ready");
    return 0;
}

uint32_t cowvm_main(const uint8_t *input, size_t input_len, uint8_t *output, size_t output_cap,
                    size_t *output_len) {
    if (inflateReset(&stream) != Z_OK)
        return 10;
    stream.next_in = (Bytef *)input;
    stream.avail_in = (uInt)input_len;
    stream.next_out = output;
    stream.avail_out = (uInt)output_cap;
    int ret = inflate(&stream, Z_FINISH);
    *output_len = stream.total_out;
    return ret == Z_STREAM_END ? 0 : (uint32_t)(100 - ret);
}
