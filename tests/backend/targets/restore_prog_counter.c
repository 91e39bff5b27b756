/* Restart proof target: a counter whose state lives in memory.
 *
 *   restore_prog_counter STATIC_MIB HEAP_MIB
 *
 * Fills a static array (up to 64 MiB, the first STATIC_MIB used) and a heap block of HEAP_MIB
 * with a pattern derived from a seed chosen at start (pid and time: not in the executable),
 * then counts: every ~5 ms it checks one 256 KiB slice of each (rotating; all of them every
 * pass) and writes "n COUNT" to stdout with write(2). The count is kept twice (heap and
 * static) and must agree. Any mismatch prints "CORRUPT ..." and exits 3, so a restart that
 * lost or mixed up memory shows in the output.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLICE (256 * 1024 / 8)           /* words checked per step */
static uint64_t static_area[64 << 17];          /* 64 MiB of uint64_t */
static uint64_t static_count;

struct state { uint64_t seed; uint64_t count; uint64_t *heap; size_t heap_words, static_words; };

static uint64_t pattern(uint64_t seed, uint64_t i) {
    uint64_t x = seed ^ (i * 0x9E3779B97F4A7C15ull);
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
    return x | 1;
}

static void check(struct state *s, const uint64_t *area, size_t words, size_t slice, const char *what) {
    size_t first = (slice * SLICE) % words;
    for (size_t i = first; i < first + SLICE && i < words; i++)
        if (area[i] != pattern(s->seed, i)) {
            dprintf(1, "CORRUPT %s word %zu count %llu\n", what, i, (unsigned long long)s->count);
            exit(3);
        }
}

int main(int argc, char **argv) {
    struct state *s = malloc(sizeof *s);
    s->static_words = (size_t)(argc > 1 ? atoi(argv[1]) : 8) << 17;
    s->heap_words = (size_t)(argc > 2 ? atoi(argv[2]) : 8) << 17;
    if (s->static_words > sizeof static_area / 8 || !s->static_words || !s->heap_words) {
        fprintf(stderr, "usage: %s STATIC_MIB(1..64) HEAP_MIB(>0)\n", argv[0]);
        return 2;
    }
    s->seed = ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL);
    s->count = 0;
    s->heap = malloc(s->heap_words * 8);
    for (size_t i = 0; i < s->static_words; i++) static_area[i] = pattern(s->seed, i);
    for (size_t i = 0; i < s->heap_words; i++) s->heap[i] = pattern(s->seed, i);
    dprintf(1, "READY pid=%d\n", getpid());
    for (;;) {
        if (s->count != static_count) {
            dprintf(1, "CORRUPT count %llu static %llu\n", (unsigned long long)s->count,
                    (unsigned long long)static_count);
            exit(3);
        }
        check(s, static_area, s->static_words, s->count, "static");
        check(s, s->heap, s->heap_words, s->count, "heap");
        dprintf(1, "n %llu\n", (unsigned long long)s->count);
        s->count++;
        static_count++;
        struct timespec t = {0, 5 * 1000 * 1000};
        while (nanosleep(&t, &t) == -1)
            ;
    }
}
