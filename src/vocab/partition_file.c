/* Partition files: /model/vocab_head/assign (V) int32 plus the /model
 * attributes vocab_size, vocab_experts, vocab_partition, i.e. the paths a
 * checkpoint of a vocab_experts model uses, so either can be given.
 * Written to a temporary name and renamed into place (no partial file under
 * the final name); read with every check done before the partition is
 * built. Serial HDF5, one process. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/h5.h"
#include "vocab/partition.h"

#define ASSIGN_PATH "/model/vocab_head/assign"

static moe_status write_file(hid_t f, const moe_vocab_part *p, const char *method, const char *path)
{
    const int V = moe_vocab_part_vocab(p);
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hsize_t dims[1] = {(hsize_t)V}, chunk[1] = {(hsize_t)(V < 65536 ? V : 65536)};
    hid_t sp = H5Screate_simple(1, dims, NULL);
    moe_status st = MOE_OK;
    if (lcpl < 0 || dcpl < 0 || sp < 0 || H5Pset_create_intermediate_group(lcpl, 1) < 0 ||
        H5Pset_chunk(dcpl, 1, chunk) < 0 || H5Pset_fletcher32(dcpl) < 0)
        st = moe_h5_fail(MOE_ERR_IO, "cannot set up the partition dataset of", NULL, path);
    hid_t ds = H5I_INVALID_HID;
    if (!st) {
        ds = H5Dcreate2(f, ASSIGN_PATH, H5T_STD_I32LE, sp, lcpl, dcpl, H5P_DEFAULT);
        if (ds < 0 || H5Dwrite(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, moe_vocab_part_assign(p)) < 0)
            st = moe_h5_fail(MOE_ERR_IO, "cannot write", ASSIGN_PATH, path);
    }
    if (ds >= 0) H5Dclose(ds);
    if (sp >= 0) H5Sclose(sp);
    if (dcpl >= 0) H5Pclose(dcpl);
    if (lcpl >= 0) H5Pclose(lcpl);
    if (st) return st;
    hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT);
    if (g < 0) return moe_h5_fail(MOE_ERR_IO, "cannot open", "/model", path);
    st = moe_h5_attr_put_i64(g, "vocab_size", V, path);
    if (!st) st = moe_h5_attr_put_i64(g, "vocab_experts", moe_vocab_part_experts(p), path);
    if (!st) st = moe_h5_attr_put_str(g, "vocab_partition", method ? method : "given", path);
    H5Gclose(g);
    return st;
}

moe_status moe_vocab_part_write(const moe_vocab_part *p, const char *path, const char *method)
{
    const size_t n = strlen(path) + 8;
    char *tmp = malloc(n);
    if (!tmp) return moe_errorf(MOE_ERR_NOMEM, "writing '%s'", path);
    snprintf(tmp, n, "%s.tmp", path);
    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    moe_status st = MOE_OK;
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) st = moe_h5_fail(MOE_ERR_IO, "cannot create", NULL, tmp);
    if (!st) st = write_file(f, p, method, path);
    if (f >= 0 && H5Fclose(f) < 0 && !st) st = moe_h5_fail(MOE_ERR_IO, "cannot close", NULL, tmp);
    moe_h5_quiet_end(&q);
    if (!st && rename(tmp, path) != 0)
        st = moe_errorf(MOE_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    if (st) unlink(tmp);
    free(tmp);
    return st;
}

/* Reads and checks the assign dataset of an open file: int32-compatible
 * integers, rank 1, the length the caller expects (if any). */
static moe_status read_assign(hid_t f, const char *path, int V_want, int32_t **out, int *V_out)
{
    *out = NULL;
    if (H5Lexists(f, "/model", H5P_DEFAULT) <= 0 || H5Lexists(f, "/model/vocab_head", H5P_DEFAULT) <= 0 ||
        H5Lexists(f, ASSIGN_PATH, H5P_DEFAULT) <= 0)
        return moe_errorf(MOE_ERR_FORMAT, "'%s' has no dataset %s (not a partition file or a vocab_experts "
                                          "checkpoint)", path, ASSIGN_PATH);
    hid_t ds = H5Dopen2(f, ASSIGN_PATH, H5P_DEFAULT);
    if (ds < 0) return moe_h5_fail(MOE_ERR_FORMAT, "cannot open", ASSIGN_PATH, path);
    hid_t t = H5Dget_type(ds), sp = H5Dget_space(ds);
    hsize_t dims[H5S_MAX_RANK];
    const int nd = sp < 0 ? -1 : H5Sget_simple_extent_dims(sp, dims, NULL);
    moe_status st = MOE_OK;
    if (t < 0 || H5Tget_class(t) != H5T_INTEGER)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': %s must hold integers", path, ASSIGN_PATH);
    else if (nd != 1)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': %s must have one dimension (it has %d)", path, ASSIGN_PATH, nd);
    else if (dims[0] < 2 || dims[0] > (hsize_t)INT32_MAX)
        st = moe_errorf(MOE_ERR_FORMAT, "'%s': %s has %llu entries", path, ASSIGN_PATH,
                        (unsigned long long)dims[0]);
    else if (V_want > 0 && dims[0] != (hsize_t)V_want)
        st = moe_errorf(MOE_ERR_ARG, "'%s': the partition covers %llu tokens but the vocabulary has %d", path,
                        (unsigned long long)dims[0], V_want);
    int32_t *a = NULL;
    if (!st && !(a = malloc((size_t)dims[0] * sizeof *a)))
        st = moe_errorf(MOE_ERR_NOMEM, "reading '%s'", path);
    /* HDF5 converts any integer type (values beyond int32 clip, and fail the range check after) */
    if (!st && H5Dread(ds, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, a) < 0)
        st = moe_h5_fail(MOE_ERR_FORMAT, "cannot read", ASSIGN_PATH, path);
    if (t >= 0) H5Tclose(t);
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(ds);
    if (st) {
        free(a);
        return st;
    }
    *out = a;
    *V_out = (int)dims[0];
    return MOE_OK;
}

moe_status moe_vocab_part_read(moe_vocab_part **out, const char *path, int V, int M)
{
    *out = NULL;
    if (access(path, R_OK) != 0) return moe_errorf(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    moe_h5_quiet q;
    moe_h5_quiet_begin(&q);
    moe_status st = MOE_OK;
    int32_t *assign = NULL;
    int Vf = 0;
    int64_t Mf = 0;
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        st = H5Fis_hdf5(path) == 0 ? moe_errorf(MOE_ERR_FORMAT, "'%s' is not an HDF5 file", path)
                                   : moe_h5_fail(MOE_ERR_FORMAT, "cannot open (truncated or damaged?)", NULL, path);
    if (!st) st = read_assign(f, path, V, &assign, &Vf);
    if (!st) {
        hid_t g = H5Gopen2(f, "/model", H5P_DEFAULT);
        st = g < 0 ? moe_h5_fail(MOE_ERR_FORMAT, "cannot open", "/model", path)
                   : moe_h5_attr_get_i64(g, "vocab_experts", &Mf, path);
        if (g >= 0) H5Gclose(g);
    }
    if (f >= 0) H5Fclose(f);
    moe_h5_quiet_end(&q);
    if (!st && (Mf < 2 || Mf > Vf))
        st = moe_errorf(MOE_ERR_ARG, "'%s': vocab_experts=%lld must be in [2, %d] (the tokens it covers)", path,
                        (long long)Mf, Vf);
    if (!st && M > 0 && Mf != M)
        st = moe_errorf(MOE_ERR_ARG, "'%s' partitions the vocabulary into %lld experts, but vocab_experts=%d",
                        path, (long long)Mf, M);
    if (!st) {
        st = moe_vocab_part_create(out, assign, Vf, (int)Mf);
        if (st == MOE_ERR_ARG) {
            char why[512]; /* the detail buffer cannot be its own argument */
            snprintf(why, sizeof why, "%s", moe_error_detail());
            st = moe_errorf(MOE_ERR_ARG, "'%s': %s", path, why);
        }
    }
    free(assign);
    return st;
}
