/* Preloaded after libasan.so into lua5.4 by scripts/test when SANITIZE=address.
 * Not part of pgcoord: it only makes the sanitized test run usable. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void asan_shim_init(void)
{
    unsetenv("LD_PRELOAD");           /* what the specs spawn runs without ASan */
    setvbuf(stdout, NULL, _IOLBF, 0); /* keep busted's summary if LSan exits early */
}

/* Keep C modules mapped at exit so leak reports can name their functions. */
int dlclose(void *handle)
{
    (void)handle;
    return 0;
}
