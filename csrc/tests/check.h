/* The C tests' minimal harness: CHECK counts and reports, main prints "N passed, N failed". */
#ifndef NAPO_TESTS_CHECK_H
#define NAPO_TESTS_CHECK_H

#include <stdio.h>

typedef struct {
  int passed;
  int failed;
} tally;

#define CHECK(t, cond)                                                                                                 \
  do {                                                                                                                 \
    if (cond) {                                                                                                        \
      (t)->passed++;                                                                                                   \
    } else {                                                                                                           \
      (t)->failed++;                                                                                                   \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                                         \
    }                                                                                                                  \
  } while (0)

#endif /* NAPO_TESTS_CHECK_H */
