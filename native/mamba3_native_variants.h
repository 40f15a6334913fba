/* The table of exported variants that export.py generates (mamba3_variants.cpp). Internal. */
#ifndef MAMBA3_NATIVE_VARIANTS_H
#define MAMBA3_NATIVE_VARIANTS_H

#include "mamba3_native.h"

typedef struct mamba3_variant {
    mamba3_step_desc desc;
    const char *name;
    void *(*load)(void);
    void (*unload)(void *module);
    int (*run)(void *module, const mamba3_step_args *args, void *stream);
} mamba3_variant;

extern const mamba3_variant MAMBA3_VARIANTS[];
extern const int MAMBA3_NUM_VARIANTS;

#endif
