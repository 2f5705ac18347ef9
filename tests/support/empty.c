/* keeps the support library non-empty */
int iw_test_support_empty_unit_(void);
int iw_test_support_empty_unit_(void)
{
    return 0;
}
