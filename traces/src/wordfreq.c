/* Tiny workload for the lackey sample trace: count words of a built-in text in a
 * chained hash table, sort them by frequency with qsort, print the top ten. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>

static const char *text =
    "the altp2m subsystem lets a monitor keep several views of guest memory "
    "each view has its own permissions and the monitor switches views when "
    "a guest touches a page it must not touch the monitor then steps the "
    "instruction and switches back so the guest sees the memory it expects "
    "views are filled lazily from the host p2m when a vcpu first walks them";

struct word {
    char *text;
    int count;
    struct word *next;
};

#define BUCKETS 64

static unsigned hash(const char *s)
{
    unsigned h = 5381;
    while (*s)
        h = h * 33 + (unsigned char)*s++;
    return h % BUCKETS;
}

static int by_count(const void *a, const void *b)
{
    const struct word *x = *(struct word *const *)a, *y = *(struct word *const *)b;
    if (x->count != y->count)
        return y->count - x->count;
    return strcmp(x->text, y->text);
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 20;
    struct word *table[BUCKETS] = {0};
    size_t nwords = 0;
    char buf[64];

    for (int r = 0; r < rounds; r++) {
        const char *p = text;
        while (*p) {
            size_t n = 0;
            while (*p && !isalpha((unsigned char)*p))
                p++;
            while (*p && isalpha((unsigned char)*p) && n < sizeof buf - 1)
                buf[n++] = (char)tolower((unsigned char)*p++);
            if (!n)
                break;
            buf[n] = 0;
            unsigned h = hash(buf);
            struct word *w = table[h];
            while (w && strcmp(w->text, buf))
                w = w->next;
            if (!w) {
                w = malloc(sizeof *w);
                w->text = strdup(buf);
                w->count = 0;
                w->next = table[h];
                table[h] = w;
                nwords++;
            }
            w->count++;
        }
    }

    struct word **all = malloc(nwords * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < BUCKETS; i++)
        for (struct word *w = table[i]; w; w = w->next)
            all[k++] = w;
    qsort(all, nwords, sizeof *all, by_count);
    for (size_t i = 0; i < nwords && i < 10; i++)
        printf("%6d %s\n", all[i]->count, all[i]->text);
    return 0;
}
