// The one place where the fused_resnet op schemas are declared. Backends register
// implementations with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; Python adds the
// fake (meta) kernels in fused_resnet/ops.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_resnet, m) {
  // Inference block end: out = act(y * scale[c] + shift[c] (+ residual)), with act = ReLU
  // when relu is true and the identity otherwise. y: (N, C, H, W) in either memory
  // format; scale, shift: (C,) fp32; residual: shape of y. The output keeps y's format.
  m.def("bn_add_relu(Tensor y, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
}

// True when this build registered CUDA kernels (tests check it when CUDA was asked for).
static PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#ifdef FUSED_RESNET_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS, "Whether _C was built with its CUDA part."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

// Importing fused_resnet._C runs the static registrations above and in the backend files.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
