// The one place where the fused_resnet op schemas of the compiled kernels are declared.
// Backends register implementations with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda;
// Python adds the fake (meta) kernels in fused_resnet/ops/native_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_resnet, m) {
  // Inference block end: out = act(y * scale[c] + shift[c] (+ residual)), with act = ReLU
  // when relu is true and the identity otherwise. y: (N, C, H, W) in either memory
  // format; scale, shift: (C,) fp32; residual: shape of y. The output keeps y's format.
  m.def("bn_add_relu(Tensor y, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
  // Per-channel batch statistics of y over (N, H, W) in one pass: mean and biased variance,
  // fp32 (fp64 for fp64 y).
  m.def("bn_stats(Tensor y) -> (Tensor mean, Tensor var)");
  // Backward of z = act(gamma * (y - mean) * rstd + beta + r), act = ReLU when z is given
  // (its mask is z > 0), else the identity. With g = dz * [z > 0] and n values per channel:
  //   dbeta = sum(g), dgamma = rstd * sum(g * (y - mean)),
  //   dy = gamma * rstd * (g - dbeta / n - (y - mean) * rstd * dgamma / n),
  //   dr = g (written when write_dr, else an empty tensor).
  // One reduction pass and one elementwise pass over (dz, z, y).
  m.def(
      "bn_act_backward(Tensor dz, Tensor? z, Tensor y, Tensor mean, Tensor rstd, Tensor gamma, "
      "bool write_dr) -> (Tensor dy, Tensor dgamma, Tensor dbeta, Tensor dr)");
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
