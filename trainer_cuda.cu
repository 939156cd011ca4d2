/* trainer_cuda.cu - the library and its CUDA backend for the GPU build of
 * the trainer (`make trainer_cuda`): trainer.c is compiled by the C
 * compiler with TR_WITH_CUDA and linked with this file, compiled by nvcc. */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#define SPARSEMEM_CUDA_IMPLEMENTATION
#include "sparsemem_cuda.cuh"
